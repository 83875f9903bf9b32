"""Distillation step throughput: the stage's training loop (images decoded from the curated
shards, cached vectors joined by key) ÷ a bare forward + backward + optimiser step of the same
image tower on in-memory tensors, same batch size, measured in one run.

Run from the repository root after `dvc repro train_teacher` (it reads the demo's curated shards,
embed cache and teacher targets):

    python benchmarks/distill_throughput.py --pairs 1000 --batch 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline import distill
from pipeline.config import load_params
from pipeline.losses import DistillWeights, distill_loss
from pipeline.models.clip import create
from pipeline.models.student import freeze_for_distillation, set_train_mode
from pipeline.train import Optimisation


def bare(model, pixels: torch.Tensor, steps: int, dim: int) -> float:
    """Images/s of forward + backward + AdamW step on tensors already in memory (one batch of
    the same preprocessed images, over and over)."""
    batch = len(pixels)
    params = freeze_for_distillation(model, None)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    set_train_mode(model)
    text, teacher = torch.randn(batch, dim), torch.randn(batch, dim)
    scale = model.logit_scale.exp().detach()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        loss = distill_loss(model.encode_image(pixels), text, teacher, None, scale, DistillWeights())["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shards", type=int, default=1, help="curated training shards to train on")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    params = load_params(args.params, only=("clip", "curate", "embed", "teacher"))
    shards = sorted((Path(params.curate.out) / "train").glob("*.tar"))[: args.shards]
    targets = distill.Targets.load(Path(params.embed.out), Path(params.teacher.targets), anchor=False)
    torch.manual_seed(0)
    model, preprocess, _ = create(params.clip.model, params.clip.pretrained)
    pairs = distill.count_pairs(shards, targets)
    opt = Optimisation(epochs=1, lr=1e-5, weight_decay=0.1, warmup_steps=1, grad_clip=1.0)
    dim = targets.captions.matrix.shape[1]
    with ThreadPoolExecutor(args.workers) as pool:
        first = next(distill.epoch_batches(shards, 1, 0, args.batch, preprocess, targets, pool))
    steps = max(5, pairs // args.batch)
    # Bare before and after the stage, so that a change in machine load shows as a spread.
    before = bare(create(params.clip.model, params.clip.pretrained)[0], first.pixels, steps, dim)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        distill.train_student(
            model, None, DistillWeights(), opt, shards, targets, preprocess, args.batch, args.workers,
            Path(tmp), torch.device("cpu"), progress=False,
        )  # fmt: skip
        stage = pairs / (time.perf_counter() - start)
    after = bare(create(params.clip.model, params.clip.pretrained)[0], first.pixels, steps, dim)
    bare_rate = (before + after) / 2
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, pairs {pairs}")
    print(f"stage  {stage:8.1f} images/s (decode + join + train, one epoch, checkpoint included)")
    print(f"bare   {bare_rate:8.1f} images/s (forward + backward + step on in-memory tensors;")
    print(f"       {before:.1f} before the stage, {after:.1f} after)")
    print(f"ratio  {stage / bare_rate:8.3f}")


if __name__ == "__main__":
    main()
