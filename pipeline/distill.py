"""distill: the CLIP student — its image tower fine-tuned toward the teacher, its text tower frozen.

Per training pair: the image, decoded from the curated shard and put through CLIP's own
preprocessing; the frozen caption embedding and the base CLIP image embedding, both from the embed
cache (the text tower is frozen, so its caption embeddings are exactly the cached ones, and the
anchor needs no second model in memory); the teacher image embedding from train_teacher's targets.
All three are joined by the pair's key.

Every caption is usable, one per image per step: an epoch visits every image once, with one of its
captions drawn by (seed, epoch, image) — curate's captions_per_image: all gives each image all
its captions, and a batch never holds one image twice (which would make a positive a negative).

Streaming: an epoch visits the curated shards in a seeded order and each shard's drawn pairs in a
seeded order, threads decode ahead of the model, and memory holds one shard's worth of images.
The lookups of cached vectors (three per pair, float16) are held whole.

Several processes (pipeline/distributed.py): every rank reads every shard, to know the epoch's
order, and decodes only the images of its own share of each global batch; the loss gathers the
global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline import distributed, images, parallel, parts
from pipeline.errors import InputError
from pipeline.files import file_digest
from pipeline.losses import DistillWeights
from pipeline.shards import read_shard
from pipeline.train import Optimisation

if TYPE_CHECKING:
    from pipeline.models.clip import ClipModel


class DistillError(InputError):
    """The student's inputs disagree (the cache, the targets and the shards), or the frozen side
    changed."""


@dataclass(frozen=True)
class Settings:
    """What, besides the optimisation, decides the student (the `distill` params)."""

    trainable_blocks: int | None  # the last N image-tower blocks (and its head); None: all
    freeze_batchnorm: bool  # BatchNorm layers stay in eval mode, with the base's statistics
    lambda_cos: float
    lambda_anchor: float
    batch_size: int

    @property
    def loss_weights(self) -> DistillWeights:
        return DistillWeights(cos=self.lambda_cos, anchor=self.lambda_anchor)


class Vectors:
    """key → row of a float16 matrix, from a Parquet table with a `key`-like column and a
    fixed-size list column."""

    def __init__(self, path: Path, key: str, column: str = "embedding"):
        table = pq.read_table(path, columns=[key, column])
        self.path = path
        self.metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        self.index = {k: i for i, k in enumerate(table.column(key).to_pylist())}
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.matrix = flat.reshape(len(self.index), -1).astype(np.float16) if len(self.index) else flat

    def get(self, keys: list[str], what: str) -> torch.Tensor:
        try:
            rows = [self.index[k] for k in keys]
        except KeyError as err:
            raise DistillError(f"{self.path}: no {what} for pair {err.args[0]!r}") from None
        return torch.from_numpy(self.matrix[rows].astype(np.float32))

    def get_some(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the keys present (zeros elsewhere) and the mask of those present."""
        mask = torch.tensor([k in self.index for k in keys], dtype=torch.bool)
        out = torch.zeros((len(keys), self.matrix.shape[1]), dtype=torch.float32)
        rows = [self.index[k] for k in keys if k in self.index]
        if rows:
            out[mask] = torch.from_numpy(self.matrix[rows].astype(np.float32))
        return out, mask


@dataclass(frozen=True)
class Targets:
    """The cached vectors a pair is trained against."""

    captions: Vectors  # embed's captions.parquet: key → frozen caption embedding
    teacher: Vectors  # teacher_targets.parquet: key → teacher image embedding
    base: Vectors | None  # embed's images.parquet: image → base CLIP image embedding (anchor)
    image_of: dict[str, str]  # pair key → image id (several pairs may share an image)

    @property
    def teacher_partial(self) -> bool:
        """Whether some pairs are meant to have no teacher target (other_captions: an image
        with one caption), as the targets file itself says; otherwise a missing one is an error."""
        return int(self.teacher.metadata.get("pairs_without_target", "0")) > 0

    def images(self) -> dict[str, list[str]]:
        """Each image's cached pairs, in key order."""
        out: dict[str, list[str]] = {}
        for key in sorted(self.captions.index):
            out.setdefault(self.image_of[key], []).append(key)
        return out

    def drawn_pairs(self, seed: int, epoch: int) -> set[str]:
        """One pair per image for this epoch, drawn by (seed, epoch, image): every caption of an
        image gets its turn over the epochs, whatever the shard layout."""
        chosen = set()
        for image, keys in self.images().items():
            digest = hashlib.sha256(f"{seed}|{epoch}|{image}".encode()).digest()
            chosen.add(keys[int.from_bytes(digest[:8], "big") % len(keys)])
        return chosen

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
    teacher_mask: torch.Tensor | None = None  # [B] bool: which pairs have a teacher target (None: all)
    # The rows each rank holds of the global batch (distributed.split), this batch being this
    # rank's share; one process: (B,). None: a batch made by hand, whole.
    counts: tuple[int, ...] | None = None


def _decode(sample: dict[str, bytes], transform: Callable) -> torch.Tensor | str:
    image = images.decode_sample(sample)
    if isinstance(image, images.Reject):
        return f"{image.reason}: {image.detail}"
    return transform(image)


@dataclass(frozen=True)
class Plan:
    """Which of an epoch's `total` pairs, in epoch order, this rank decodes: its share
    (distributed.split) of each global batch of `size`; a last batch of one pair is dropped
    (InfoNCE needs a negative). One process: every pair of every batch."""

    total: int
    size: int
    ctx: distributed.Context

    def share(self, index: int) -> tuple[range, tuple[int, ...]]:
        """This rank's rows (as epoch indices) of the batch holding pair `index`, and every
        rank's count of that batch's rows."""
        start = index - index % self.size
        n = min(self.size, self.total - start)
        if n < 2:
            return range(0), ()
        rows, counts = distributed.split(n, self.ctx)
        return range(start + rows.start, start + rows.stop), counts

    def mine(self, index: int) -> bool:
        return index < self.total and index in self.share(index)[0]


def epoch_batches(
    shards: list[Path],
    epoch: int,
    seed: int,
    batch_size: int,
    transform: Callable,
    targets: Targets,
    pool: Executor,
    window: int = 64,
    ctx: distributed.Context | None = None,
) -> Iterator[Batch]:
    """One epoch of batches in an order fixed by (seed, epoch): every cached image once, with the
    pair drawn for it (Targets.drawn_pairs). A pair the embed cache lacks (embed refused its image)
    is never drawn; a drawn pair whose image no longer decodes, or that no shard holds, is an
    error, since the cache and the shards then disagree.

    `ctx` (default: this process's) of several processes: every rank reads every shard, for the
    order, and decodes and yields only its share of each batch (`Plan`), one per global batch."""
    ctx = ctx or distributed.current()
    rng = np.random.default_rng([seed, epoch])
    chosen = targets.drawn_pairs(seed, epoch)
    plan = Plan(len(chosen), batch_size, ctx)
    seen = 0

    def drawn() -> Iterator[tuple[int, int, str, dict[str, bytes]]]:
        nonlocal seen
        for s in rng.permutation(len(shards)):
            samples = [(k, smp) for k, smp in read_shard(shards[s]) if k in chosen]
            for i in rng.permutation(len(samples)):
                if plan.mine(seen):
                    yield seen, s, *samples[i]
                seen += 1

    def decode(item: tuple[int, int, str, dict[str, bytes]]) -> tuple[int, int, str, torch.Tensor | str]:
        index, s, key, sample = item
        return index, s, key, _decode(sample, transform)

    pending: list[tuple[str, torch.Tensor]] = []
    for index, s, key, pixels in parallel.ordered_map(decode, drawn(), pool, window):
        if isinstance(pixels, str):
            raise DistillError(f"{shards[s]}: sample {key!r}: {pixels}")
        pending.append((key, pixels))
        rows, counts = plan.share(index)
        if index == rows[-1]:  # this rank's last row of the batch
            yield _batch(pending, targets, counts)
            pending = []
    if seen != len(chosen):
        raise DistillError(
            f"{len(chosen) - seen} pair(s) of the embed cache are in none of the {len(shards)} curated "
            "shards: the cache is from other shards; run embed again"
        )


def _batch(items: list[tuple[str, torch.Tensor]], targets: Targets, counts: tuple[int, ...]) -> Batch:
    keys = [k for k, _ in items]
    base = None
    if targets.base is not None:
        base = targets.base.get([targets.image_of[k] for k in keys], "base image embedding")
    mask = None
    if targets.teacher_partial:
        teacher, mask = targets.teacher.get_some(keys)
    else:
        teacher = targets.teacher.get(keys, "teacher target")
    return Batch(
        keys,
        torch.stack([p for _, p in items]),
        targets.captions.get(keys, "caption embedding"),
        teacher,
        base,
        mask,
        counts,
    )


def count_images(targets: Targets) -> int:
    """Images an epoch visits: those with at least one cached pair."""
    return len(targets.images())


def student_features(model: torch.nn.Module, batch: Batch, device: torch.device) -> dict[str, Any]:
    """The student's image embeddings and the cached vectors, on the device."""
    return {
        "student": cast("ClipModel", model).encode_image(batch.pixels.to(device, non_blocking=True)),
        "text": F.normalize(batch.caption.to(device), dim=-1),
        "teacher": batch.teacher.to(device),
        "base": batch.base.to(device) if batch.base is not None else None,
        "teacher_mask": batch.teacher_mask.to(device) if batch.teacher_mask is not None else None,
    }


def run_key(
    model: str,
    weights: str,
    settings: Settings,
    opt: Optimisation,
    inputs: list[Path],
    device,
    processes: int = 1,
) -> str:
    """Everything the checkpoints depend on: a resumed run must be the same run (several
    processes sum the gradients in another order: another run, as another device is)."""
    from pipeline import losses, train
    from pipeline.models import student

    path = Path(weights)
    spec = {
        "model": model,
        "weights": file_digest(path) if path.is_file() else weights,
        "distill": asdict(settings),
        "optimisation": asdict(opt),
        "inputs": [[p.name, file_digest(p)] for p in inputs],
        "device": device.type,
        "torch": torch.__version__,
    }
    if processes > 1:
        spec["processes"] = processes
    return parts.run_key(spec, [__name__, losses, train, student, distributed])


def train_student(
    model: torch.nn.Module,
    settings: Settings,
    opt: Optimisation,
    shards: list[Path],
    targets: Targets,
    transform: Callable,
    checkpoints: Path,
    device: torch.device,
    workers: int = 2,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
):
    """Fine-tune the image tower (all of it, or its last `trainable_blocks` blocks) with the
    distillation loss, resuming from `checkpoints`. Weight decay applies to matrices only
    (train.decay_groups); `freeze_batchnorm` keeps the BatchNorm layers in eval mode, their running
    statistics the base model's. Returns (model, trainer, frozen-side hash); raises DistillError if
    anything outside the image tower changed. `on_step(step, losses)` is called after every
    optimiser step.

    Several processes (pipeline/distributed.py): each decodes its share of every global batch,
    the loss is the global batch's (gathered), and every rank checks the frozen side's hash."""
    from pipeline.losses import distill_loss
    from pipeline.models.student import freeze_for_distillation, frozen_hash, set_train_mode
    from pipeline.train import Trainer, contrastive_batches, decay_groups

    batch_size = settings.batch_size
    ctx = distributed.current()
    distributed.check_batch_size(batch_size, ctx.world_size, "distill.batch_size")
    before = frozen_hash(model)
    freeze_for_distillation(model, settings.trainable_blocks)
    n = count_images(targets)
    if n < 2:
        raise DistillError(f"only {n} training images with cached embeddings; need at least 2")
    trainer = Trainer(
        model,
        decay_groups(model, opt.weight_decay),
        opt,
        steps_per_epoch=contrastive_batches(n, batch_size),
        checkpoints=checkpoints,
        device=device,
        progress=progress,
        train_mode=partial(set_train_mode, freeze_batchnorm=settings.freeze_batchnorm),
    )
    # The temperature is the base model's and stays so: it belongs to the frozen side.
    scale = cast("ClipModel", model).logit_scale.exp().detach()

    weights = settings.loss_weights
    with parallel.pool(workers, "threads", name="decode") as pool:

        def data(epoch: int) -> Iterator[Batch]:
            return epoch_batches(shards, epoch, opt.seed, batch_size, transform, targets, pool, ctx=ctx)

        def loss_fn(batch: Batch) -> dict[str, torch.Tensor]:
            # The global batch's rows, every rank's (one process: as they are).
            f = {
                k: distributed.gather(v, batch.counts)
                for k, v in student_features(model, batch, device).items()
            }
            return distill_loss(
                f["student"], f["text"], f["teacher"], f["base"], scale, weights, f["teacher_mask"]
            )

        trainer.fit(data, loss_fn, on_step=on_step)
    model.eval()
    after = frozen_hash(model)
    if after != before:
        raise DistillError(f"the frozen text tower changed during training ({before[:12]} → {after[:12]})")
    return model, trainer, before
