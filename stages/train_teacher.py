"""Stage `train_teacher` (dvc.yaml): the cross-modal meta-teacher on the embed cache; its weights
(models/teacher.pt), per-epoch metrics (metrics/teacher.json, DVCLive plots under
metrics/teacher/) and the distillation targets of every pair (data/teacher_targets.parquet)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import teach
from pipeline.config import ParamsError, load_params
from pipeline.detect import file_hash
from pipeline.models import teacher as teacher_model
from pipeline.models.teacher import TeacherConfig
from pipeline.train import Optimisation, pick_device
from stages.outputs import log_live, prune_runs, write_json

METRICS = Path("metrics/teacher.json")
LIVE_DIR = Path("metrics/teacher")


def run(params_file: Path, progress: bool = True) -> dict:
    params = load_params(params_file, only=("teacher", "embed"))
    root = params_file.parent
    cfg = params.teacher
    folder = root / params.embed.out / "teacher"
    shards = tuple(sorted(folder.glob("*.tar")))
    if not shards:
        raise ParamsError(
            f"{params_file}: embed.out: no teacher shards in {folder}; run the embed stage first"
        )
    try:
        dim = int(next(teach.read_pairs(shards[0])).caption.shape[-1])
    except ValueError as err:
        raise ParamsError(f"{params_file}: embed.out: {err}") from None
    if dim % cfg.heads:
        raise ParamsError(
            f"{params_file}: teacher.heads: {cfg.heads} does not divide the embedding width {dim}"
        )
    try:
        device = pick_device(cfg.device)
    except ValueError as err:
        raise ParamsError(f"{params_file}: teacher.device: {err}") from None
    model_cfg, opt = configs(cfg, dim)
    data = teach.Data(shards, cfg.batch_size, cfg.val_fraction, cfg.seed, prior=model_cfg.inputs == "regions")
    key = run_key(model_cfg, opt, data, cfg.temperature, cfg.learnable_temperature, device)
    checkpoints = root / cfg.scratch / key
    start = time.perf_counter()
    model, history, slice_size = teach.train_teacher(
        model_cfg,
        opt,
        data,
        cfg.temperature,
        cfg.learnable_temperature,
        checkpoints,
        device,
        on_epoch_end=lambda e, r: print(json.dumps({"epoch": e, **r}), file=sys.stderr),
        progress=progress,
        target=cfg.target,
    )
    seconds = time.perf_counter() - start
    try:
        use_epoch = teach.best_epoch(history) if cfg.use_epoch == "best" else cfg.use_epoch
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
    write_json(root / METRICS, metrics, sort_keys=True)
    # Curves only: the validation slice's sizes are constants, in metrics/teacher.json.
    log_live(root / LIVE_DIR, history, skip=("step", "epoch", "val_images", "val_captions"))
    prune_runs(root / cfg.scratch, keep=key)
    print(json.dumps({"targets": n, "pairs_without_target": without, "chosen": metrics["chosen"]}))
    return metrics


def configs(cfg, dim: int) -> tuple[TeacherConfig, Optimisation]:
    """The teacher's architecture and optimisation from the `teacher` params section."""
    model_cfg = TeacherConfig(
        dim=dim,
        heads=cfg.heads,
        dropout=cfg.dropout,
        attention=cfg.attention,
        regions=cfg.regions,
        region_weights=cfg.region_weights,
        pool_temperature=cfg.pool_temperature,
        aggregation_clusters=cfg.aggregation_clusters,
        inputs="regions" if cfg.target == "regions" else "regions_and_caption",
    )
    opt = Optimisation.pick(cfg.model_dump(), optimizer="adam")
    return model_cfg, opt


def run_key(model_cfg, opt, data: teach.Data, temperature: float, learnable: bool, device) -> str:
    """Everything the checkpoints depend on: a resumed run must be the same run."""
    code = [
        teach,
        teacher_model,
        sys.modules[Optimisation.__module__],
        sys.modules[teach.info_nce.__module__],
    ]
    spec = {
        "model": asdict(model_cfg),
        "optimisation": asdict(opt),
        "data": {
            "batch_size": data.batch_size,
            "val_fraction": data.val_fraction,
            "seed": data.seed,
            "prior": data.prior,
        },
        "shards": [[s.name, file_hash(s)] for s in data.shards],
        "temperature": [temperature, learnable],
        "device": device.type,
        "torch": torch.__version__,
        "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in code],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _save_teacher(path: Path, model, model_cfg: TeacherConfig, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"config": asdict(model_cfg), "epoch": epoch, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
