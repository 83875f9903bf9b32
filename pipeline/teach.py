"""train_teacher: the cross-modal meta-teacher, trained on the embed cache alone, and its
distillation targets.

Reads only embed's teacher-ready shards (per pair: regions [R, D], weights [R], tokens [T, D],
caption [D], image [D]); every embedding is L2-normalised on reading, so attention and pooling see
CLIP's cosine geometry. Streaming: an epoch visits the shards in a seeded order, each shard's
pairs in a seeded order, so memory holds a shard and the order depends on (seed, epoch) alone.

A held-out slice of the training pairs — chosen by a hash of (seed, key), so it does not depend
on the shard layout — gives per-epoch validation loss and retrieval (R@1 both ways), next to the
same retrieval with the base CLIP image embeddings for reference. `targets` writes the teacher
image embedding of every pair with the weights of the chosen epoch.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import info_nce
from pipeline.metrics import retrieval_metrics
from pipeline.models.teacher import PairBatch, Teacher, TeacherConfig, pad
from pipeline.shards import read_shard
from pipeline.tables import write_table
from pipeline.train import Optimisation, Trainer, contrastive_batches

FIELDS = ("regions", "weights", "tokens", "caption", "image")


@dataclass(frozen=True)
class Pair:
    key: str
    regions: np.ndarray  # [R, D]
    weights: np.ndarray  # [R]
    tokens: np.ndarray  # [T, D]
    caption: np.ndarray  # [D]
    image: np.ndarray  # [D]: the base CLIP image embedding, for reference only


# Teacher shards up to this many bytes in all are read once and kept in memory (as they are on
# disk: float16 arrays) for every later epoch: on the demo, reading the tar members took 60 % of
# an epoch. Larger caches stream from disk every epoch, in bounded memory.
MEMORY_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class Data:
    shards: tuple[Path, ...]
    batch_size: int
    val_fraction: float
    seed: int
    memory_cache_bytes: int = MEMORY_CACHE_BYTES
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def pairs(self, shard: Path) -> list[Pair] | Iterator[Pair]:
        """A shard's pairs: from memory once read, when all the shards fit the budget."""
        if shard in self._cache:
            return self._cache[shard]
        if sum(s.stat().st_size for s in self.shards) > self.memory_cache_bytes:
            return read_pairs(shard)
        self._cache[shard] = list(read_pairs(shard))
        return self._cache[shard]


class TeacherWithScale(nn.Module):
    """The teacher and the InfoNCE temperature (as CLIP's log logit scale), saved together."""

    def __init__(self, cfg: TeacherConfig, temperature: float, learnable: bool):
        super().__init__()
        self.teacher = Teacher(cfg)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / temperature))), requires_grad=learnable)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=float(np.log(100))).exp()  # CLIP's cap on the scale

    def forward(self, b: PairBatch) -> torch.Tensor:
        return self.teacher(b)


# --- reading the cache ------------------------------------------------------------------------


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_pairs(shard: Path) -> Iterator[Pair]:
    for key, sample in read_shard(shard):
        missing = [f for f in FIELDS if f"{f}.npy" not in sample]
        if missing:
            raise ValueError(f"{shard}: sample {key}: missing {', '.join(f + '.npy' for f in missing)}")
        yield Pair(key, *(_array(sample[f"{f}.npy"]) for f in FIELDS))


def is_validation(key: str, fraction: float, seed: int) -> bool:
    """A fixed pseudo-random slice of the pairs, by key: the same whatever the shards."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _unit(a: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(a.astype(np.float32)), dim=-1)


def collate(pairs: list[Pair]) -> PairBatch:
    regions, rmask = pad([_unit(p.regions) for p in pairs])
    weights, _ = pad([torch.from_numpy(p.weights.astype(np.float32)) for p in pairs])
    tokens, tmask = pad([_unit(p.tokens) for p in pairs])
    caption = torch.stack([_unit(p.caption) for p in pairs])
    return PairBatch(regions, rmask, weights, tokens, tmask, caption)


def train_batches(data: Data, epoch: int) -> Iterator[PairBatch]:
    """The training pairs of one epoch in batches, in an order fixed by (seed, epoch); a last
    batch of fewer than two pairs is dropped (InfoNCE needs a negative)."""
    rng = np.random.default_rng([data.seed, epoch])
    batch: list[Pair] = []
    for s in rng.permutation(len(data.shards)):
        pairs = [
            p for p in data.pairs(data.shards[s]) if not is_validation(p.key, data.val_fraction, data.seed)
        ]
        for i in rng.permutation(len(pairs)):
            batch.append(pairs[i])
            if len(batch) == data.batch_size:
                yield collate(batch)
                batch = []
    if len(batch) >= 2:
        yield collate(batch)


def validation_pairs(data: Data) -> list[Pair]:
    return [
        p for s in data.shards for p in data.pairs(s) if is_validation(p.key, data.val_fraction, data.seed)
    ]


def count_training_pairs(data: Data) -> int:
    return sum(
        1
        for s in data.shards
        for key, _ in read_shard(s)
        if not is_validation(key, data.val_fraction, data.seed)
    )


# --- validation -------------------------------------------------------------------------------


@torch.no_grad()
def embed_pairs(model: TeacherWithScale, pairs: list[Pair], batch_size: int, device) -> torch.Tensor:
    model.eval()
    out = [
        model(collate(pairs[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def r_at_1(image: torch.Tensor, caption: torch.Tensor) -> dict[str, float]:
    m = retrieval_metrics(image, caption, torch.arange(len(caption)), ks=(1,))
    return {"t2i_R@1": m["text_to_image"]["R@1"], "i2t_R@1": m["image_to_text"]["R@1"]}


def validate(model: TeacherWithScale, pairs: list[Pair], batch_size: int, device) -> dict[str, float]:
    """Validation loss and R@1 of the teacher embeddings against the captions of the slice."""
    if len(pairs) < 2:
        return {}
    teacher = embed_pairs(model, pairs, batch_size, device)
    caption = torch.stack([_unit(p.caption) for p in pairs])
    with torch.no_grad():
        loss = float(info_nce(teacher, caption, model.scale().cpu()))
    return {"val_loss": loss, **{f"val_{k}": v for k, v in r_at_1(teacher, caption).items()}}


def base_reference(pairs: list[Pair]) -> dict[str, float]:
    """The same retrieval with the base CLIP image embeddings: what the teacher is compared to."""
    if len(pairs) < 2:
        return {}
    image = torch.stack([_unit(p.image) for p in pairs])
    caption = torch.stack([_unit(p.caption) for p in pairs])
    return {f"base_{k}": v for k, v in r_at_1(image, caption).items()}


# --- training and targets ---------------------------------------------------------------------


def train_teacher(
    cfg: TeacherConfig,
    opt: Optimisation,
    data: Data,
    temperature: float,
    learnable_temperature: bool,
    checkpoints: Path,
    device: torch.device,
    on_epoch_end=None,
    on_step=None,
    progress: bool = True,
) -> tuple[TeacherWithScale, list[dict], dict]:
    """Train (resuming from `checkpoints`), validating every epoch. Returns the model (last
    epoch), the per-epoch history and the base CLIP reference on the validation slice."""
    torch.manual_seed(opt.seed)
    model = TeacherWithScale(cfg, temperature, learnable_temperature).to(device)
    n_train = count_training_pairs(data)
    if n_train < 2:
        raise ValueError(f"only {n_train} training pairs after the validation slice; need at least 2")
    val = validation_pairs(data)
    reference = base_reference(val)
    trainer = Trainer(
        model,
        [p for p in model.parameters() if p.requires_grad],
        opt,
        steps_per_epoch=contrastive_batches(n_train, data.batch_size),
        checkpoints=checkpoints,
        device=device,
        progress=progress,
    )

    def loss_fn(batch: PairBatch) -> dict[str, torch.Tensor]:
        batch = batch.to(device)
        return {"total": info_nce(model(batch), batch.caption, model.scale())}

    def on_epoch(epoch: int) -> dict[str, float]:
        record = validate(model, val, data.batch_size, device)
        record["logit_scale"] = float(model.scale().detach())
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        return record

    history = trainer.fit(lambda e: train_batches(data, e), loss_fn, on_step=on_step, on_epoch=on_epoch)
    return model, history, {"pairs": len(val), **reference}


def load_epoch(model: TeacherWithScale, checkpoints: Path, epoch: int, device) -> TeacherWithScale:
    path = checkpoints / f"epoch-{epoch}.pt"
    if not path.is_file():
        raise ValueError(f"teacher.use_epoch: no checkpoint for epoch {epoch} ({path})")
    model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"])
    return model.eval()


def targets_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


@torch.no_grad()
def write_targets(model: TeacherWithScale, data: Data, out: Path, device, dim: int) -> int:
    """The teacher image embedding (L2-normalised, float16) of every pair, validation slice
    included, in shard order. Returns the number of rows."""
    keys, rows = [], []
    for shard in data.shards:
        pairs = list(data.pairs(shard))
        for i in range(0, len(pairs), data.batch_size):
            chunk = pairs[i : i + data.batch_size]
            emb = model(collate(chunk).to(device)).float().cpu().numpy().astype(np.float16)
            keys.extend(p.key for p in chunk)
            rows.append(emb)
    flat = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), dim),
        },
        schema=targets_schema(dim),
    )
    write_table(out, table, targets_schema(dim))
    return len(keys)


def summary(history: list[dict], reference: dict, use_epoch: int) -> dict:
    return {
        "use_epoch": use_epoch,
        "epochs": history,
        "chosen": next((h for h in history if h["epoch"] == use_epoch), None),
        "validation_base_clip": reference,
    }
