"""Distillation step throughput: the stage's training loop (images decoded from the curated
shards, cached vectors joined by key) ÷ a bare forward + backward + optimiser step of the same
image tower on in-memory tensors, same batch size, measured in one run.

Run from the repository root after `dvc repro train_teacher` (it reads the demo's curated shards,
embed cache and teacher targets):

    python benchmarks/distill_throughput.py [--shards 1] [--batch 64] [--workers 2] [--repeats 3]
    python benchmarks/distill_throughput.py --model ViT-B-32 --pretrained none --pairs 320 --batch 32

--model / --pretrained train another CLIP on the same images (default: params' clip.model and the
weights stage's checkpoint); when its embedding width differs from the cache's, the cached
vectors are replaced by seeded random ones of its width under the same keys (the joins and their
cost stay; the values do not matter for throughput). --pairs keeps the first N pairs of the shards.

- stage steps: images/s of the stage's optimiser steps, timed from the end of its second step to
  the end of its last full batch, so that, like the bare loop, two warm-up steps are left out.
  This is the training-step throughput the data loading must not starve: decoding, the joins by
  key and the step itself are all inside it.
- stage whole: images/s of the whole `train_student` call, fixed costs included (counting the
  pairs, hashing the frozen text tower before and after, the epoch's checkpoint). These do not grow
  with the data; on a small benchmark epoch they weigh more than on a real one.
- bare: forward + backward + clip + AdamW step on one batch already in memory, two warm-up steps.

Bare and stage alternate --repeats times so that both see the same machine; each figure is the best
of its repeats (the machine may be shared, and noise only ever slows a run down), and the median of
the per-repeat ratios is printed beside the best-of ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline import distill
from pipeline.config import load_params
from pipeline.losses import DistillWeights, distill_loss
from pipeline.models.clip import create
from pipeline.models.student import freeze_for_distillation, set_train_mode
from pipeline.shards import read_shard
from pipeline.train import Optimisation

WARMUP_STEPS = 2


def bare(model, pixels: torch.Tensor, steps: int, dim: int) -> float:
    """Images/s of forward + backward + AdamW step on tensors already in memory (one batch of
    the same preprocessed images, over and over)."""
    batch = len(pixels)
    params = freeze_for_distillation(model, None)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    set_train_mode(model)
    text, teacher = torch.randn(batch, dim), torch.randn(batch, dim)
    scale = model.logit_scale.exp().detach()
    for i in range(steps + WARMUP_STEPS):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        loss = distill_loss(model.encode_image(pixels), text, teacher, None, scale, DistillWeights())["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def restrict(targets: distill.Targets, keys: list[str], dim: int) -> distill.Targets:
    """The targets of `keys` only (the stage skips pairs the cache lacks), as `dim`-wide vectors:
    the cached ones when they are that wide, else seeded random ones under the same keys."""

    def part(vectors: distill.Vectors) -> distill.Vectors:
        out = copy.copy(vectors)
        out.index = {k: i for i, k in enumerate(keys)}
        rows = [vectors.index[k] for k in keys]
        out.matrix = vectors.matrix[rows]
        if out.matrix.shape[1] != dim:
            rng = np.random.default_rng(len(out.matrix))
            out.matrix = rng.standard_normal((len(keys), dim)).astype(np.float16)
        return out

    return distill.Targets(part(targets.captions), part(targets.teacher), None, targets.image_of)


def stage(spec, shards, targets, batch: int, workers: int, pairs: int) -> tuple[float, float]:
    """(steady step images/s, whole-call images/s) of one epoch of the stage's training loop."""
    torch.manual_seed(0)
    model, preprocess, _ = create(*spec)
    # Fixed, not from params, so that the stage does what `bare` does: every image-tower block
    # trains, BatchNorm frozen (set_train_mode's default), DistillWeights()'s loss (no anchor:
    # `restrict` keeps no anchor vectors), AdamW with the same lr, decay and clipping, one step a
    # batch, float32 (amp auto is off on the CPU).
    weights = DistillWeights()
    cfg = distill.Settings(
        trainable_blocks=None,
        freeze_batchnorm=True,
        lambda_cos=weights.cos,
        lambda_anchor=weights.anchor,
        batch_size=batch,
    )
    opt = Optimisation(
        epochs=1,
        lr=1e-5,
        weight_decay=0.1,
        warmup_steps=1,
        grad_clip=1.0,
        accumulate=1,
        optimizer="adamw",
        amp="auto",
        seed=0,
    )
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        distill.train_student(
            model, cfg, opt, shards, targets, preprocess, Path(tmp), torch.device("cpu"), workers,
            progress=False, on_step=lambda step, losses: ends.append(time.perf_counter()),
        )  # fmt: skip
        whole = pairs / (time.perf_counter() - start)
    full = pairs // batch  # steps with a whole batch; a last partial batch is left out
    steady = (full - WARMUP_STEPS) * batch / (ends[full - 1] - ends[WARMUP_STEPS - 1])
    return steady, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shards", type=int, default=1, help="curated training shards to train on")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="open_clip architecture (default: clip.model)")
    ap.add_argument("--pretrained", help="its weights: a tag, a file or none (default: clip.checkpoint)")
    ap.add_argument("--pairs", type=int, help="the first N pairs of the shards (default: all)")
    args = ap.parse_args()
    params = load_params(args.params, only=("clip", "curate", "embed", "teacher"))
    spec = (args.model or params.clip.model, args.pretrained or str(params.clip.checkpoint))
    shards = sorted((Path(params.curate.out) / "train").glob("*.tar"))[: args.shards]
    targets = distill.Targets.load(Path(params.embed.out), Path(params.teacher.targets), anchor=False)
    keys = [k for s in shards for k, _ in read_shard(s) if k in targets.captions.index][: args.pairs]
    model, preprocess, _ = create(*spec)
    dim = model.encode_text(torch.zeros(1, 1, dtype=torch.long)).shape[1]  # the joint space's width
    targets = restrict(targets, keys, dim)
    pairs = distill.count_images(targets)  # an epoch visits each image once
    if pairs // args.batch <= WARMUP_STEPS:
        raise SystemExit(f"{pairs} pairs make {pairs // args.batch} full batches of {args.batch}: too few")
    with ThreadPoolExecutor(args.workers) as pool:
        first = next(distill.epoch_batches(shards, 1, 0, args.batch, preprocess, targets, pool))
    steps = pairs // args.batch - WARMUP_STEPS  # as many timed steps as the stage's
    print(f"{spec[0]} ({spec[1]}), threads {torch.get_num_threads()}, batch {args.batch}, "
          f"workers {args.workers}, pairs {pairs}")  # fmt: skip
    rows = []
    for r in range(args.repeats):
        b = bare(create(*spec)[0], first.pixels, steps, dim)
        steady, whole = stage(spec, shards, targets, args.batch, args.workers, pairs)
        rows.append((b, steady, whole))
        print(f"repeat {r + 1}: bare {b:7.1f}  stage steps {steady:7.1f}  stage whole {whole:7.1f} images/s"
              f"  ratio {steady / b:.3f}")  # fmt: skip
    best_bare, best_steady, best_whole = (max(col) for col in zip(*rows))
    print(
        f"best   bare {best_bare:7.1f}  stage steps {best_steady:7.1f}  "
        f"stage whole {best_whole:7.1f} images/s"
    )
    print(f"ratio (stage steps ÷ bare, best of {args.repeats})  {best_steady / best_bare:.3f}")
    print(f"ratio (median of the repeats)          {statistics.median(s / b for b, s, _ in rows):.3f}")
    print(f"ratio (stage whole ÷ bare, best)       {best_whole / best_bare:.3f}")


if __name__ == "__main__":
    main()
