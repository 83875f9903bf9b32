"""train_teacher: the cross-modal meta-teacher, trained on the embed cache alone, and its
distillation targets.

Reads only embed's teacher-ready shards (per pair: regions [R, D], weights [R], prior [R],
tokens [T, D], caption [D], image [D], and the pair's image key) through `teacher_pairs`, and
validates every epoch on held-out training images through `teacher_validation`.

Targets (`target`), what the student is pulled toward for a pair (image i, caption j):
- paper: the teacher conditioned on caption j itself (the paper). Measured on the demo, this target
  is mostly the pair's own caption, which the contrastive term already pulls toward.
- other_captions: the mean of the teacher's embeddings of image i conditioned on each of its OTHER
  captions, so that the target says what the other annotators saw, not caption j again. An image
  with one caption has no such target; its pairs train without the teacher term.
- regions: a teacher that reads no caption (TeacherConfig.inputs "regions"), one target per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import distributed, parts
from pipeline.files import file_digest
from pipeline.losses import info_nce
from pipeline.models.teacher import PairBatch, TeacherConfig, TeacherWithScale
from pipeline.tables import write_table
from pipeline.teacher_pairs import Data, Pair, collate, count_training_pairs, epoch_pairs, validation_pairs
from pipeline.teacher_validation import validate
from pipeline.train import Optimisation, Trainer, contrastive_batches

TARGETS = ("paper", "other_captions", "regions")


@dataclass(frozen=True)
class Settings:
    """What, besides the architecture and the optimisation, decides the teacher (`teacher` params)."""

    temperature: float  # InfoNCE temperature (its initial value when learnable)
    learnable_temperature: bool
    target: str  # one of TARGETS


def run_key(
    cfg: TeacherConfig, settings: Settings, opt: Optimisation, data: Data, device, processes: int = 1
) -> str:
    """Everything the checkpoints depend on: a resumed run must be the same run (several
    processes sum the gradients in another order: another run, as another device is)."""
    from pipeline import losses, teacher_pairs, teacher_validation, train
    from pipeline.models import teacher

    spec = {
        "model": asdict(cfg),
        "settings": asdict(settings),
        "optimisation": asdict(opt),
        "data": {
            "batch_size": data.batch_size,
            "val_fraction": data.val_fraction,
            "seed": data.seed,
            "prior": data.prior,
        },
        "shards": [[s.name, file_digest(s)] for s in data.shards],
        "device": device.type,
        "torch": torch.__version__,
    }
    if processes > 1:
        spec["processes"] = processes
    return parts.run_key(
        spec, [__name__, teacher, teacher_pairs, teacher_validation, train, losses, distributed]
    )


def train_teacher(
    cfg: TeacherConfig,
    settings: Settings,
    opt: Optimisation,
    data: Data,
    checkpoints: Path,
    device: torch.device,
    on_epoch_end=None,
    on_step=None,
    progress: bool = True,
) -> tuple[TeacherWithScale, list[dict], dict]:
    """Train (resuming from `checkpoints`), validating every epoch. Returns the model (last
    epoch), the per-epoch history and the size of the validation slice.

    Several processes (pipeline/distributed.py): each collates its share of every global batch,
    and InfoNCE runs on the gathered global batch; every rank validates (the same figures)."""
    ctx = distributed.current()
    distributed.check_batch_size(data.batch_size, ctx.world_size, "teacher.batch_size")
    target = settings.target
    if target not in TARGETS:
        raise ValueError(f"teacher.target: {target!r} is not one of {', '.join(TARGETS)}")
    if (target == "regions") != (cfg.inputs == "regions"):
        raise ValueError(f"teacher.target {target!r} and a teacher reading {cfg.inputs} do not go together")
    torch.manual_seed(opt.seed)
    model = TeacherWithScale(cfg, settings.temperature, settings.learnable_temperature).to(device)
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

    def batches(epoch: int) -> Iterator[tuple[PairBatch, tuple[int, ...]]]:
        for pairs in epoch_pairs(data, epoch):
            mine, counts = distributed.local_rows(pairs, ctx)  # one process: all of them
            yield collate(mine, data.prior), counts

    def loss_fn(item: tuple[PairBatch, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        batch, counts = item
        batch = batch.to(device)
        images = distributed.gather(model(batch), counts)  # one process: as they are
        captions = distributed.gather(batch.caption, counts)
        return {"total": info_nce(images, captions, model.scale())}

    def on_epoch(epoch: int) -> dict[str, float]:
        record = validate(model, val, data.batch_size, device, target, data.seed, data.prior)
        record["logit_scale"] = float(model.scale().detach())
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        return record

    history = trainer.fit(batches, loss_fn, on_step=on_step, on_epoch=on_epoch)
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
