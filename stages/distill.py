"""Stage `distill` (dvc.yaml): the CLIP student, image tower fine-tuned toward the teacher and
text tower frozen (checked by hash); models/student.pt loads with open_clip itself."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pipeline import distill, distributed, parallel
from pipeline.config import Params, load_params, settings
from pipeline.errors import ParamsError
from pipeline.models.clip import create, save_checkpoint
from pipeline.shards import verify_shards
from pipeline.train import Optimisation
from stages import launch
from stages.outputs import METRICS_DIR, LiveCurves, prune_runs, read_record, require, write_record

# Everything but the losses: to metrics/info/distill.json (pipeline/records.py).
INFO_KEYS = frozenset(
    {"device", "images", "pairs", "pairs_without_teacher_target", "steps", "teacher_target"}
    | {"text_tower_sha256", "text_tower_unchanged", "trainable_parameters", "train_seconds"}
)
LIVE_DIR = Path("metrics/distill")


def run(params_file: Path, progress: bool = True) -> dict:
    """The stage. runtime.processes > 1: run through torchrun (stages/launch.py), and return the
    record it wrote; in a data-parallel run, every rank trains and rank 0 alone writes the
    outputs (the others return an empty record)."""
    params = load_params(params_file, only=("clip", "curate", "embed", "teacher", "distill", "runtime"))
    root = params_file.parent
    cfg, rt = params.distill, params.runtime
    train, manifest = root / params.curate.out / "train", root / params.curate.out / "train.parquet"
    embeddings, targets_file = root / params.embed.out, root / params.teacher.targets
    weights_path = root / params.clip.checkpoint
    require(
        params_file,
        [
            (embeddings / "captions.parquet", "embed"),
            (targets_file, "train_teacher"),
            (weights_path, "weights"),
            (train, "curate"),
            (manifest, "curate"),
        ],
    )
    if launch.relaunched(params_file, "distill", rt.processes, cfg.batch_size, "distill.batch_size"):
        return read_record(root / METRICS_DIR, "distill")
    shards = verify_shards(train, manifest)  # a short or cut shard is named before any work
    with distributed.joined(rt.device) as (ctx, device):
        return _train(params_file, params, shards, ctx, device, progress)


def _train(
    params_file: Path,
    params: Params,
    shards: list[Path],
    ctx: distributed.Context,
    device: torch.device,
    progress: bool,
) -> dict:
    root = params_file.parent
    cfg, rt = params.distill, params.runtime
    embeddings, targets_file = root / params.embed.out, root / params.teacher.targets
    weights_path = root / params.clip.checkpoint
    model, preprocess, _ = create(params.clip.model, str(weights_path), device)
    model.float()
    from pipeline.models.student import checkpoint_activations, trainable_names

    try:
        trainable_names(model, cfg.trainable_blocks)
    except ValueError as err:
        raise ParamsError(f"{params_file}: {err}") from None
    if rt.grad_checkpointing and not checkpoint_activations(model, True):
        print("runtime.grad_checkpointing: the image tower has no transformer blocks; off", file=sys.stderr)
    step = settings(distill.Settings, cfg)
    opt = settings(Optimisation, cfg, optimizer="adamw")
    targets = distill.Targets.load(embeddings, targets_file, anchor=cfg.lambda_anchor > 0)
    inputs = [*shards, embeddings / "captions.parquet", targets_file]
    if cfg.lambda_anchor > 0:
        inputs.append(embeddings / "images.parquet")
    key = distill.run_key(
        params.clip.model, str(weights_path), step, opt, inputs, device, processes=ctx.world_size
    )
    scratch = root / rt.scratch / "distill"
    live = LiveCurves(root / LIVE_DIR)
    start = time.perf_counter()
    model, trainer, text_hash = distill.train_student(
        model,
        step,
        opt,
        shards,
        targets,
        preprocess,
        scratch / key,
        device,
        parallel.count(rt.workers),  # "auto": this process's share of the cores
        progress,
        on_step=(lambda s, losses: live.log({"step": s, **losses})) if ctx.is_main else None,
    )
    seconds = time.perf_counter() - start
    if not ctx.is_main:  # done after the last checkpoint's barrier (and the text tower's check)
        return {}
    save_checkpoint(model.cpu(), root / cfg.out)
    metrics = {
        "images": distill.count_images(targets),
        "pairs": len(targets.captions.index),
        "teacher_target": targets.teacher.metadata.get("target"),
        "pairs_without_teacher_target": int(targets.teacher.metadata.get("pairs_without_target", "0")),
        "epochs": trainer.history,
        "final": {k: v for k, v in trainer.history[-1].items() if k != "epoch"},  # dvc exp show's columns
        "steps": len(trainer.steps),
        "text_tower_sha256": text_hash,
        "text_tower_unchanged": True,  # train_student raises otherwise
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(seconds, 1),
        "device": device.type,
    }
    write_record(root / METRICS_DIR, "distill", metrics, INFO_KEYS)
    live.finish(trainer.steps)
    prune_runs(scratch, keep=key)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("epochs", "final")}))
    return metrics
