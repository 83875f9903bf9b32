"""Teacher training cost against the embed stage that feeds it, measured in one run.

Run from the repository root after `dvc repro detect` (it reads the demo's curated shards and
detect regions):

    python benchmarks/teacher_throughput.py [--params params.yaml] [--epochs 3] [--threads 0]

1. The embed stage, fresh: `pipeline.embed.embed` on every curated training shard into an empty
   scratch folder (model loading excluded), with the params' embed settings.
2. The teacher on the teacher shards that run just wrote: `pipeline.teach.train_teacher` with the
   params' teacher settings for --epochs epochs; each epoch's time is taken from the end of the
   previous one, so it covers the training steps, the validation pass and the checkpoint. The
   first epoch reads the teacher shards from disk; later ones read them from memory when they
   fit `pipeline.teacher_pairs.MEMORY_CACHE_BYTES`.

Prints the embed time, each epoch's time, training pairs/s, and
ratio = median teacher epoch time ÷ embed stage time (the goal: ≤ 0.05, so that an ablation that
retrains the teacher costs a small fraction of the cache it reuses).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import embed, teach, teacher_pairs
from pipeline.config import load_params, settings
from pipeline.models.clip import load_encoder
from pipeline.models.teacher import TeacherConfig
from pipeline.train import Optimisation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    root = args.params.parent
    curated = root / params.curate.out
    shards = sorted((curated / "train").glob("*.tar"))
    regions = root / params.detect.out
    if not shards or not regions.exists():
        raise SystemExit(f"no curated shards in {curated / 'train'} or no {regions}: run `dvc repro detect`")
    encoder = load_encoder(params.clip.model, params.clip.pretrained, params.runtime.device, root)

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        start = time.perf_counter()
        cache = embed.embed(
            shards, curated / "train.parquet", regions, tmp / "embeddings", tmp / "embed-scratch",
            encoder, settings(embed.Settings, params.embed, batch_size=params.runtime.batch_size.embed),
            params.runtime.workers, False,
        )  # fmt: skip
        embed_seconds = time.perf_counter() - start
        del encoder

        cfg = params.teacher
        teacher_shards = tuple(sorted((tmp / "embeddings" / "teacher").glob("*.tar")))
        dim = int(next(teacher_pairs.read_pairs(teacher_shards[0])).caption.shape[-1])
        # Built as stages/train_teacher.py builds them, then --epochs epochs.
        inputs = "regions" if cfg.target == "regions" else "regions_and_caption"
        model_cfg = settings(TeacherConfig, cfg, dim=dim, inputs=inputs)
        step = settings(teach.Settings, cfg)
        opt = settings(Optimisation, cfg, optimizer="adam", accumulate=1, amp="auto")
        opt = replace(opt, epochs=args.epochs)
        prior = model_cfg.inputs == "regions"
        data = teacher_pairs.Data(teacher_shards, cfg.batch_size, cfg.val_fraction, cfg.seed, prior=prior)
        marks = [time.perf_counter()]
        teach.train_teacher(
            model_cfg, step, opt, data, tmp / "checkpoints", torch.device("cpu"),
            on_epoch_end=lambda e, r: marks.append(time.perf_counter()), progress=False,
        )  # fmt: skip
        n_train = teacher_pairs.count_training_pairs(data)

    epochs = [b - a for a, b in zip(marks, marks[1:])]
    epoch = statistics.median(epochs)
    print(f"threads {torch.get_num_threads()}, model {params.clip.model}, pairs {cache['pairs']}")
    print(f"embed stage   {embed_seconds:8.1f} s  ({cache['pairs'] / embed_seconds:.1f} pairs/s, "
          f"{cache['regions']} regions)")  # fmt: skip
    print(f"teacher epoch {epoch:8.2f} s  (median of {', '.join(f'{e:.2f}' for e in epochs)})")
    print(f"              {n_train / epoch:8.0f} training pairs/s ({n_train} training pairs, "
          f"batch {cfg.batch_size}, validation included)")  # fmt: skip
    print(f"ratio         {epoch / embed_seconds:8.3f}  (median teacher epoch ÷ embed stage; goal ≤ 0.05)")
    mean = sum(epochs) / len(epochs)
    print(f"              {mean / embed_seconds:8.3f}  (mean epoch, the first one's disk reads included)")


if __name__ == "__main__":
    main()
