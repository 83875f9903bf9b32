"""train_teacher: the cross-modal meta-teacher, trained on the embed cache alone, and its
distillation targets.

Reads only embed's teacher-ready shards (per pair: regions [R, D], weights [R], prior [R],
tokens [T, D], caption [D], image [D], and the pair's image key); every embedding is
L2-normalised on reading, so attention and pooling see CLIP's cosine geometry. Streaming: an epoch
visits the shards in a seeded order, each shard's pairs in a seeded order, so memory holds a shard
and the order depends on (seed, epoch) alone.

Targets (`target`), what the student is pulled toward for a pair (image i, caption j):
- paper: the teacher conditioned on caption j itself (the paper). Measured on the demo, this target
  is mostly the pair's own caption, which the contrastive term already pulls toward.
- other_captions: the mean of the teacher's embeddings of image i conditioned on each of its OTHER
  captions, so that the target says what the other annotators saw, not caption j again. An image
  with one caption has no such target; its pairs train without the teacher term.
- regions: a teacher that reads no caption (TeacherConfig.inputs "regions"), one target per image.

Validation. A held-out slice of the training *images* (all their pairs together), by a hash of
(seed, image), never Karpathy val or test. A target conditioned on a caption retrieves that caption
trivially, so every epoch measures each target against captions it was NOT conditioned on
(`unseen_validation`): per image one caption j is drawn; the paper target t(i, j) is scored against
the image's other captions, the other_captions target (conditioned on those) against caption j,
the regions target against all of them — next to the base CLIP image embedding on the same
captions, and with the target's cosine to the base image embedding and to caption j.
"""

from __future__ import annotations

import hashlib
import io
import json
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

FIELDS = ("regions", "weights", "prior", "tokens", "caption", "image")
TARGETS = ("paper", "other_captions", "regions")


@dataclass(frozen=True)
class Pair:
    key: str
    image_id: str  # the image's key: the pairs of one image share it
    regions: np.ndarray  # [R, D]
    weights: np.ndarray  # [R]
    prior: np.ndarray  # [R]: the weights without their caption factor
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
    prior: bool = False  # region weights without the caption factor (a teacher that reads no caption)
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
        missing = [f"{f}.npy" for f in FIELDS if f"{f}.npy" not in sample] + ["json"] * ("json" not in sample)
        if missing:
            raise ValueError(
                f"{shard}: sample {key}: missing {', '.join(missing)} (an older embed cache: run embed again)"
            )
        yield Pair(key, _image_id(shard, key, sample), *(_array(sample[f"{f}.npy"]) for f in FIELDS))


def _image_id(shard: Path, key: str, sample: dict[str, bytes]) -> str:
    """The image a teacher sample belongs to, from its json member."""
    image_id = json.loads(sample["json"]).get("image") if "json" in sample else None
    if not isinstance(image_id, str):
        raise ValueError(f"{shard}: sample {key}: json has no image key")
    return image_id


def is_validation(image_id: str, fraction: float, seed: int) -> bool:
    """A fixed pseudo-random slice of the images, by image key: the same whatever the shards, and
    every pair of an image on the same side."""
    digest = hashlib.sha256(f"{seed}|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _unit(a: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(a.astype(np.float32)), dim=-1)


def collate(pairs: list[Pair], prior: bool = False) -> PairBatch:
    """A padded batch; `prior`: the caption-free region weights in place of the pair's own."""
    regions, rmask = pad([_unit(p.regions) for p in pairs])
    weights, _ = pad([torch.from_numpy((p.prior if prior else p.weights).astype(np.float32)) for p in pairs])
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
            p
            for p in data.pairs(data.shards[s])
            if not is_validation(p.image_id, data.val_fraction, data.seed)
        ]
        for i in rng.permutation(len(pairs)):
            batch.append(pairs[i])
            if len(batch) == data.batch_size:
                yield collate(batch, data.prior)
                batch = []
    if len(batch) >= 2:
        yield collate(batch, data.prior)


def validation_pairs(data: Data) -> list[Pair]:
    return [
        p
        for s in data.shards
        for p in data.pairs(s)
        if is_validation(p.image_id, data.val_fraction, data.seed)
    ]


def count_training_pairs(data: Data) -> int:
    """Training pairs, from each sample's json alone (no array is decoded)."""
    return sum(
        1
        for s in data.shards
        for key, sample in read_shard(s)
        if not is_validation(_image_id(s, key, sample), data.val_fraction, data.seed)
    )


# --- validation -------------------------------------------------------------------------------


@torch.no_grad()
def embed_pairs(
    model: TeacherWithScale, pairs: list[Pair], batch_size: int, device, prior: bool
) -> torch.Tensor:
    """The teacher's embedding of each pair (conditioned on the pair's own caption, unless the
    teacher reads none), float32 on the CPU."""
    model.eval()
    out = [
        model(collate(pairs[i : i + batch_size], prior).to(device)).float().cpu()
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def by_image(pairs: list[Pair]) -> dict[str, list[int]]:
    """Indices of each image's pairs, images and pairs in key order."""
    groups: dict[str, list[int]] = {}
    for i in sorted(range(len(pairs)), key=lambda i: pairs[i].key):
        groups.setdefault(pairs[i].image_id, []).append(i)
    return dict(sorted(groups.items()))


def drawn_caption(image_id: str, n: int, seed: int) -> int:
    """Which of an image's n pairs (in key order) the validation conditions on: fixed by
    (seed, image)."""
    digest = hashlib.sha256(f"{seed}|drawn|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _r_at(image: torch.Tensor, caption: torch.Tensor, owner: torch.Tensor, prefix: str) -> dict[str, float]:
    m = retrieval_metrics(image, caption, owner, ks=(1, 5))
    return {
        f"{prefix}t2i_R@1": m["text_to_image"]["R@1"],
        f"{prefix}i2t_R@1": m["image_to_text"]["R@1"],
        f"{prefix}t2i_R@5": m["text_to_image"]["R@5"],
        f"{prefix}i2t_R@5": m["image_to_text"]["R@5"],
    }


def unseen_validation(embedded: torch.Tensor, pairs: list[Pair], target: str, seed: int) -> dict[str, float]:
    """Each image's target scored against captions it was not conditioned on (module doc), with
    the base CLIP image embedding on the same captions. `embedded`: the teacher's embedding of
    every pair in `pairs`. Images that leave no unseen caption (one caption, paper and
    other_captions targets) are left out; with none left the result is empty."""
    targets, bases, own, captions, owner = [], [], [], [], []
    for image_id, idx in by_image(pairs).items():
        if target != "regions" and len(idx) < 2:
            continue
        j = drawn_caption(image_id, len(idx), seed)
        others = [k for n, k in enumerate(idx) if n != j]
        if target == "paper":
            t, scored = embedded[idx[j]], others
        elif target == "other_captions":
            t, scored = F.normalize(embedded[others].sum(0), dim=-1), [idx[j]]
        else:
            t, scored = embedded[idx[j]], idx
        image = len(targets)
        targets.append(t)
        bases.append(_unit(pairs[idx[j]].image))
        own.append(_unit(pairs[idx[j]].caption))
        captions += [_unit(pairs[k].caption) for k in scored]
        owner += [image] * len(scored)
    if len(targets) < 2:
        return {}
    t, b, c = torch.stack(targets), torch.stack(bases), torch.stack(own)
    caps, owners = torch.stack(captions), torch.tensor(owner)
    return {
        "images": len(targets),
        "captions": len(captions),
        **_r_at(t, caps, owners, "unseen_"),
        **_r_at(b, caps, owners, "base_"),
        "cos_base_image": float((t * b).sum(-1).mean()),
        "cos_own_caption": float((t * c).sum(-1).mean()),
        "base_cos_own_caption": float((b * c).sum(-1).mean()),
    }


def validate(
    model: TeacherWithScale, pairs: list[Pair], batch_size: int, device, target: str, seed: int, prior: bool
) -> dict[str, float]:
    """The training objective on the held-out images (InfoNCE against each pair's own caption)
    and the leak-free measures of `unseen_validation`, prefixed val_."""
    if len(pairs) < 2:
        return {}
    embedded = embed_pairs(model, pairs, batch_size, device, prior)
    caption = torch.stack([_unit(p.caption) for p in pairs])
    with torch.no_grad():
        loss = float(info_nce(embedded, caption, model.scale().cpu()))
    unseen = unseen_validation(embedded, pairs, target, seed)
    return {"val_loss": loss, **{f"val_{k}": v for k, v in unseen.items()}}


def unseen_score(record: dict) -> float | None:
    """What `use_epoch: best` maximises: the mean of the unseen-caption R@1 both ways."""
    a, b = record.get("val_unseen_t2i_R@1"), record.get("val_unseen_i2t_R@1")
    return None if a is None or b is None else (a + b) / 2


def best_epoch(history: list[dict]) -> int:
    """The epoch with the best unseen-caption R@1 (the earliest on a tie); an error without them."""
    scored = [(unseen_score(h), -h["epoch"]) for h in history if unseen_score(h) is not None]
    if not scored:
        raise ValueError(
            "teacher.use_epoch: best needs the unseen-caption validation, which this cache cannot give "
            "(no held-out image with two captions: curate.captions_per_image: all); name an epoch"
        )
    return -max(scored)[1]


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
    target: str = "paper",
) -> tuple[TeacherWithScale, list[dict], dict]:
    """Train (resuming from `checkpoints`), validating every epoch. Returns the model (last
    epoch), the per-epoch history and the size of the validation slice."""
    if target not in TARGETS:
        raise ValueError(f"teacher.target: {target!r} is not one of {', '.join(TARGETS)}")
    if (target == "regions") != (cfg.inputs == "regions"):
        raise ValueError(f"teacher.target {target!r} and a teacher reading {cfg.inputs} do not go together")
    torch.manual_seed(opt.seed)
    model = TeacherWithScale(cfg, temperature, learnable_temperature).to(device)
    n_train = count_training_pairs(data)
    if n_train < 2:
        raise ValueError(f"only {n_train} training pairs after the validation slice; need at least 2")
    val = validation_pairs(data)
    slice_size = {"pairs": len(val), "images": len({p.image_id for p in val})}
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
        record = validate(model, val, data.batch_size, device, target, data.seed, data.prior)
        record["logit_scale"] = float(model.scale().detach())
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        return record

    history = trainer.fit(lambda e: train_batches(data, e), loss_fn, on_step=on_step, on_epoch=on_epoch)
    return model, history, slice_size


def load_epoch(model: TeacherWithScale, checkpoints: Path, epoch: int, device) -> TeacherWithScale:
    path = checkpoints / f"epoch-{epoch}.pt"
    if not path.is_file():
        raise ValueError(f"teacher.use_epoch: no checkpoint for epoch {epoch} ({path})")
    model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"])
    return model.eval()


def targets_schema(dim: int, target: str = "paper", without: int = 0) -> pa.Schema:
    """key → target embedding; the metadata says which target and how many pairs have none (an
    image with one caption under other_captions), so that a reader can tell a pair meant to go
    without from a missing row."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        ],
        metadata={"target": target, "pairs_without_target": str(without)},
    )


@torch.no_grad()
def _shard_embeddings(
    model: TeacherWithScale, data: Data, shard: Path, device
) -> tuple[list[Pair], np.ndarray]:
    pairs = list(data.pairs(shard))
    chunks = [
        model(collate(pairs[i : i + data.batch_size], data.prior).to(device)).float().cpu().numpy()
        for i in range(0, len(pairs), data.batch_size)
    ]
    return pairs, np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


@torch.no_grad()
def write_targets(
    model: TeacherWithScale, data: Data, out: Path, device, dim: int, target: str = "paper"
) -> tuple[int, int]:
    """Every pair's target (L2-normalised, float16), validation slice included, in shard order;
    see the module doc for the kinds. Returns (rows, pairs without a target).

    other_captions streams twice: a first pass sums each image's (normalised) embeddings, a second
    takes each pair's own embedding out of its image's sum; memory holds one vector per image."""
    if target not in TARGETS:
        raise ValueError(f"teacher.target: {target!r} is not one of {', '.join(TARGETS)}")
    model.eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    if target == "other_captions":
        for shard in data.shards:
            pairs, emb = _shard_embeddings(model, data, shard, device)
            for p, e in zip(pairs, emb):
                sums[p.image_id] = sums.get(p.image_id, 0) + e
                counts[p.image_id] = counts.get(p.image_id, 0) + 1
    keys, rows, without = [], [], 0
    for shard in data.shards:
        pairs, emb = _shard_embeddings(model, data, shard, device)
        for p, e in zip(pairs, emb):
            if target == "other_captions":
                if counts[p.image_id] < 2:
                    without += 1
                    continue
                e = sums[p.image_id] - e
                e = e / max(float(np.linalg.norm(e)), 1e-12)
            keys.append(p.key)
            rows.append(e.astype(np.float16))
    flat = np.stack(rows) if rows else np.zeros((0, dim), np.float16)
    schema = targets_schema(dim, target, without)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), dim),
        },
        schema=schema,
    )
    write_table(out, table, schema)
    return len(keys), without


def summary(history: list[dict], slice_size: dict, use_epoch: int, target: str) -> dict:
    return {
        "target": target,
        "use_epoch": use_epoch,
        "epochs": history,
        "chosen": next((h for h in history if h["epoch"] == use_epoch), None),
        "validation_slice": slice_size,
    }
