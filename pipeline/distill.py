"""distill: the CLIP student — its image tower fine-tuned toward the teacher, its text tower frozen.

Per training pair: the image, decoded from the curated shard and put through CLIP's own
preprocessing; the frozen caption embedding and the base CLIP image embedding, both from the embed
cache (the text tower is frozen, so its caption embeddings are exactly the cached ones, and the
anchor needs no second model in memory); the teacher image embedding from train_teacher's targets.
All three are joined by the pair's key.

Streaming: an epoch visits the curated shards in a seeded order and each shard's pairs in a seeded
order, threads decode ahead of the model, and memory holds one shard's worth of images. The
lookups of cached vectors (three per pair, float16) are held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline import images
from pipeline.detect import IMAGE_EXTS, ordered_map
from pipeline.shards import read_shard


class DistillError(ValueError):
    pass


class Vectors:
    """key → row of a float16 matrix, from a Parquet table with a `key`-like column and a
    fixed-size list column."""

    def __init__(self, path: Path, key: str, column: str = "embedding"):
        table = pq.read_table(path, columns=[key, column])
        self.path = path
        self.index = {k: i for i, k in enumerate(table.column(key).to_pylist())}
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.matrix = flat.reshape(len(self.index), -1).astype(np.float16) if len(self.index) else flat

    def get(self, keys: list[str], what: str) -> torch.Tensor:
        try:
            rows = [self.index[k] for k in keys]
        except KeyError as err:
            raise DistillError(f"{self.path}: no {what} for pair {err.args[0]!r}") from None
        return torch.from_numpy(self.matrix[rows].astype(np.float32))


@dataclass(frozen=True)
class Targets:
    """The cached vectors a pair is trained against."""

    captions: Vectors  # embed's captions.parquet: key → frozen caption embedding
    teacher: Vectors  # teacher_targets.parquet: key → teacher image embedding
    base: Vectors | None  # embed's images.parquet: image → base CLIP image embedding (anchor)
    image_of: dict[str, str]  # pair key → image id (several pairs may share an image)

    @classmethod
    def load(cls, embeddings: Path, teacher_targets: Path, anchor: bool) -> Targets:
        captions = Vectors(embeddings / "captions.parquet", "key")
        image_of = dict(
            zip(
                *(
                    pq.read_table(embeddings / "captions.parquet", columns=["key", "image"])
                    .column(c)
                    .to_pylist()
                    for c in ("key", "image")
                )
            )
        )
        base = Vectors(embeddings / "images.parquet", "image") if anchor else None
        return cls(captions, Vectors(teacher_targets, "key"), base, image_of)


@dataclass
class Batch:
    keys: list[str]
    pixels: torch.Tensor  # [B, 3, H, W], preprocessed
    caption: torch.Tensor  # [B, D]
    teacher: torch.Tensor  # [B, D]
    base: torch.Tensor | None  # [B, D]


def _decode(sample: dict[str, bytes], transform: Callable) -> torch.Tensor | str:
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        return f"no image member among {sorted(sample)}"
    try:
        return transform(images.decode(data))
    except images.ImageReject as err:
        return f"{err.reason}: {err.message}"


def epoch_batches(
    shards: list[Path],
    epoch: int,
    seed: int,
    batch_size: int,
    transform: Callable,
    targets: Targets,
    pool: ThreadPoolExecutor,
    window: int = 64,
) -> Iterator[Batch]:
    """One epoch of batches in an order fixed by (seed, epoch). A pair the embed cache lacks
    (embed refused its image) is skipped; a pair in the cache whose image no longer decodes is an
    error, since the cache and the shards then disagree."""
    rng = np.random.default_rng([seed, epoch])
    pending: list[tuple[str, torch.Tensor]] = []
    for s in rng.permutation(len(shards)):
        samples = [(k, smp) for k, smp in read_shard(shards[s]) if k in targets.captions.index]
        order = rng.permutation(len(samples))
        decoded = ordered_map(
            pool, lambda kv: (kv[0], _decode(kv[1], transform)), (samples[i] for i in order), window
        )
        for key, pixels in decoded:
            if isinstance(pixels, str):
                raise DistillError(f"{shards[s]}: sample {key!r}: {pixels}")
            pending.append((key, pixels))
            if len(pending) == batch_size:
                yield _batch(pending, targets)
                pending = []
    if len(pending) >= 2:  # InfoNCE needs a negative
        yield _batch(pending, targets)


def _batch(items: list[tuple[str, torch.Tensor]], targets: Targets) -> Batch:
    keys = [k for k, _ in items]
    base = None
    if targets.base is not None:
        base = targets.base.get([targets.image_of[k] for k in keys], "base image embedding")
    return Batch(
        keys,
        torch.stack([p for _, p in items]),
        targets.captions.get(keys, "caption embedding"),
        targets.teacher.get(keys, "teacher target"),
        base,
    )


def count_pairs(shards: list[Path], targets: Targets) -> int:
    return sum(1 for s in shards for k, _ in read_shard(s) if k in targets.captions.index)


def student_features(model: torch.nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The student's image embeddings and the cached vectors, on the device."""
    return {
        "student": model.encode_image(batch.pixels.to(device, non_blocking=True)),
        "text": F.normalize(batch.caption.to(device), dim=-1),
        "teacher": batch.teacher.to(device),
        "base": batch.base.to(device) if batch.base is not None else None,
    }


def train_student(
    model: torch.nn.Module,
    blocks: int | None,
    weights,
    opt,
    shards: list[Path],
    targets: Targets,
    transform: Callable,
    batch_size: int,
    workers: int,
    checkpoints: Path,
    device: torch.device,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
):
    """Fine-tune the image tower (all of it, or its last `blocks` blocks) with the distillation
    loss, resuming from `checkpoints`. Returns (model, trainer, frozen-side hash); raises
    DistillError if anything outside the image tower changed. `on_step(step, losses)` is called
    after every optimiser step."""
    from pipeline.losses import distill_loss
    from pipeline.models.student import freeze_for_distillation, frozen_hash, set_train_mode
    from pipeline.train import Trainer, contrastive_batches

    before = frozen_hash(model)
    params = freeze_for_distillation(model, blocks)
    n = count_pairs(shards, targets)
    if n < 2:
        raise DistillError(f"only {n} training pairs with cached embeddings; need at least 2")
    trainer = Trainer(
        model,
        params,
        opt,
        steps_per_epoch=contrastive_batches(n, batch_size),
        checkpoints=checkpoints,
        device=device,
        progress=progress,
        train_mode=set_train_mode,
    )
    # The temperature is the base model's and stays so: it belongs to the frozen side.
    scale = model.logit_scale.exp().detach()

    with ThreadPoolExecutor(workers) as pool:

        def data(epoch: int) -> Iterator[Batch]:
            return epoch_batches(shards, epoch, opt.seed, batch_size, transform, targets, pool)

        def loss_fn(batch: Batch) -> dict[str, torch.Tensor]:
            f = student_features(model, batch, device)
            return distill_loss(f["student"], f["text"], f["teacher"], f["base"], scale, weights)

        trainer.fit(data, loss_fn, on_step=on_step)
    model.eval()
    after = frozen_hash(model)
    if after != before:
        raise DistillError(f"the frozen text tower changed during training ({before[:12]} → {after[:12]})")
    return model, trainer, before
