"""Stage `train_teacher` (dvc.yaml): the cross-modal meta-teacher on the embed cache; its weights
(models/teacher.pt), per-epoch metrics (metrics/teacher.json, DVCLive plots under
metrics/teacher/) and the distillation targets of every pair (data/teacher_targets.parquet)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import distributed, teach, teacher_pairs, teacher_validation
from pipeline.config import Params, load_params, settings
from pipeline.errors import InputError, ParamsError
from pipeline.files import atomic_file
from pipeline.models.teacher import TeacherConfig
from pipeline.shards import verify_shards
from pipeline.train import Optimisation
from stages import launch
from stages.outputs import METRICS_DIR, LiveCurves, prune_runs, read_record, require, write_record

# What is not a figure of the teacher: to metrics/info/teacher.json (pipeline/records.py).
INFO_KEYS = frozenset(
    {"device", "pairs_without_target", "target", "targets", "train_seconds", "use_epoch"}
    | {"validation_slice", "val_images", "val_captions"}
)
LIVE_DIR = Path("metrics/teacher")


def run(params_file: Path, progress: bool = True) -> dict:
    """The stage. runtime.processes > 1: run through torchrun (stages/launch.py), and return the
    record it wrote; in a data-parallel run, every rank trains and rank 0 alone writes the
    outputs (the others return an empty record)."""
    params = load_params(params_file, only=("teacher", "embed", "runtime"))
    root = params_file.parent
    cfg = params.teacher
    folder, captions = root / params.embed.out / "teacher", root / params.embed.out / "captions.parquet"
    require(params_file, [(folder, "embed"), (captions, "embed")])
    if launch.relaunched(
        params_file, "train-teacher", params.runtime.processes, cfg.batch_size, "teacher.batch_size"
    ):
        return read_record(root / METRICS_DIR, "teacher")
    # Every teacher shard against embed's table of its pairs: a short or cut shard is named here.
    shards = tuple(verify_shards(folder, captions))
    if not shards:
        raise InputError(f"{captions}: no pair was embedded (every one refused: see its rejects.parquet)")
    dim = int(next(teacher_pairs.read_pairs(shards[0])).caption.shape[-1])
    if dim % cfg.heads:
        raise ParamsError(
            f"{params_file}: teacher.heads: {cfg.heads} does not divide the embedding width {dim}"
        )
    with distributed.joined(params.runtime.device) as (ctx, device):
        return _train(params_file, params, shards, dim, ctx, device, progress)


def _train(
    params_file: Path,
    params: Params,
    shards: tuple[Path, ...],
    dim: int,
    ctx: distributed.Context,
    device: torch.device,
    progress: bool,
) -> dict:
    root = params_file.parent
    cfg = params.teacher
    model_cfg = settings(
        TeacherConfig, cfg, dim=dim, inputs="regions" if cfg.target == "regions" else "regions_and_caption"
    )
    step = settings(teach.Settings, cfg)
    # The teacher section has no accumulate or amp keys: a batch a step, autocast on CUDA only.
    opt = settings(Optimisation, cfg, optimizer="adam", accumulate=1, amp="auto")
    prior = model_cfg.inputs == "regions"
    data = teacher_pairs.Data(shards, cfg.batch_size, cfg.val_fraction, cfg.seed, prior=prior)
    key = teach.run_key(model_cfg, step, opt, data, device, processes=ctx.world_size)
    scratch = root / params.runtime.scratch / "teacher"
    checkpoints = scratch / key
    # Curves only: the validation slice's sizes are constants, in metrics/info/teacher.json.
    live = LiveCurves(root / LIVE_DIR, skip=("step", "epoch", "val_images", "val_captions"))

    def epoch_done(epoch: int, record: dict) -> None:
        print(json.dumps({"epoch": epoch, **record}), file=sys.stderr)
        live.log(record)

    start = time.perf_counter()
    model, history, slice_size = teach.train_teacher(
        model_cfg,
        step,
        opt,
        data,
        checkpoints,
        device,
        on_epoch_end=epoch_done if ctx.is_main else None,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    if not ctx.is_main:  # done after the last checkpoint's barrier: rank 0 writes the targets
        return {}
    try:
        use_epoch = teacher_validation.best_epoch(history) if cfg.use_epoch == "best" else cfg.use_epoch
    except ValueError as err:
        raise ParamsError(f"{params_file}: {err}") from None
    teach.load_epoch(model, checkpoints, use_epoch, device)
    n, without = teach.write_targets(model, data, root / cfg.targets, device, dim, cfg.target)
    _save_teacher(root / cfg.out, model, model_cfg, use_epoch)
    metrics = {
        **teach.summary(history, slice_size, use_epoch, cfg.target),
        "targets": n,
        "pairs_without_target": without,
        "train_seconds": round(seconds, 1),
        "device": device.type,
    }
    write_record(root / METRICS_DIR, "teacher", metrics, INFO_KEYS)
    live.finish(history)
    prune_runs(scratch, keep=key)
    print(json.dumps({"targets": n, "pairs_without_target": without, "chosen": metrics["chosen"]}))
    return metrics


def _save_teacher(path: Path, model, model_cfg: TeacherConfig, epoch: int) -> None:
    # Saved by name, not through atomic_torch_save's buffer: torch names the archive's folder after
    # the file (`.teacher.pt`), and the committed outputs were written so.
    with atomic_file(path) as tmp:
        torch.save({"config": asdict(model_cfg), "epoch": epoch, "state_dict": model.state_dict()}, tmp)
