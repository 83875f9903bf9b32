"""Stage `distill` (dvc.yaml): the CLIP student, image tower fine-tuned toward the teacher and
text tower frozen (checked by hash); models/student.pt loads with open_clip itself."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import distill
from pipeline.config import ParamsError, load_params
from pipeline.detect import file_hash
from pipeline.losses import DistillWeights
from pipeline.models.clip import create, save_checkpoint
from pipeline.train import Optimisation, pick_device
from stages.outputs import log_live, prune_runs, write_json

METRICS = Path("metrics/distill.json")
LIVE_DIR = Path("metrics/distill")


def run(params_file: Path, progress: bool = True) -> dict:
    params = load_params(params_file, only=("clip", "curate", "embed", "teacher", "distill"))
    root = params_file.parent
    cfg = params.distill
    shards = sorted((root / params.curate.out / "train").glob("*.tar"))
    embeddings, targets_file = root / params.embed.out, root / params.teacher.targets
    for path, stage in ((embeddings / "captions.parquet", "embed"), (targets_file, "train_teacher")):
        if not path.is_file():
            raise ParamsError(f"{params_file}: {path} does not exist; run the {stage} stage first")
    if not shards:
        raise ParamsError(f"{params_file}: curate.out: no training shards; run the curate stage first")
    try:
        device = pick_device(cfg.device)
    except ValueError as err:
        raise ParamsError(f"{params_file}: distill.device: {err}") from None
    weights_path = root / params.clip.checkpoint
    if not weights_path.is_file():
        raise ParamsError(
            f"{params_file}: clip.checkpoint: {weights_path} does not exist; run the weights stage first"
        )
    model, preprocess, _ = create(params.clip.model, str(weights_path), device)
    model.float()
    try:
        from pipeline.models.student import trainable_names

        trainable_names(model, cfg.trainable_blocks)
    except ValueError as err:
        raise ParamsError(f"{params_file}: {err}") from None
    opt = Optimisation.pick(cfg.model_dump())
    loss_weights = DistillWeights(cos=cfg.lambda_cos, anchor=cfg.lambda_anchor)
    targets = distill.Targets.load(embeddings, targets_file, anchor=cfg.lambda_anchor > 0)
    inputs = [*shards, embeddings / "captions.parquet", targets_file]
    if cfg.lambda_anchor > 0:
        inputs.append(embeddings / "images.parquet")
    key = run_key(params.clip.model, weights_path, cfg, opt, inputs, device)
    start = time.perf_counter()
    model, trainer, text_hash = distill.train_student(
        model,
        cfg.trainable_blocks,
        loss_weights,
        opt,
        shards,
        targets,
        preprocess,
        cfg.batch_size,
        cfg.workers,
        root / cfg.scratch / key,
        device,
        progress,
        freeze_batchnorm=cfg.freeze_batchnorm,
    )
    seconds = time.perf_counter() - start
    save_checkpoint(model.cpu(), root / cfg.out)
    metrics = {
        "images": distill.count_images(targets),
        "pairs": len(targets.captions.index),
        "teacher_target": targets.teacher.metadata.get("target"),
        "pairs_without_teacher_target": int(targets.teacher.metadata.get("pairs_without_target", "0")),
        "epochs": trainer.history,
        "steps": len(trainer.steps),
        "text_tower_sha256": text_hash,
        "text_tower_unchanged": True,  # train_student raises otherwise
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(seconds, 1),
        "device": device.type,
    }
    write_json(root / METRICS, metrics, sort_keys=True)
    log_live(root / LIVE_DIR, trainer.steps)
    prune_runs(root / cfg.scratch, keep=key)
    print(json.dumps({k: v for k, v in metrics.items() if k != "epochs"}))
    return metrics


def run_key(model: str, weights, cfg, opt: Optimisation, inputs: list[Path], device: torch.device) -> str:
    """Everything the checkpoints depend on: a resumed run must be the same run."""
    from pipeline import losses, train
    from pipeline.models import student

    code = [distill, losses, train, student]
    spec = {
        "model": model,
        "weights": file_hash(Path(weights)) if Path(str(weights)).is_file() else str(weights),
        "distill": {
            k: v for k, v in cfg.model_dump().items() if k not in ("out", "scratch", "workers", "device")
        },
        "optimisation": asdict(opt),
        "inputs": [[p.name, file_hash(p)] for p in inputs],
        "device": device.type,
        "torch": torch.__version__,
        "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in code],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
