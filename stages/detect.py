"""Stage `detect` (dvc.yaml): YOLO regions of every training image into data/regions.parquet."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import ParamsError, load_params
from pipeline.detect import Settings, detect
from pipeline.models import detector as yolo
from stages.outputs import write_json

METRICS = Path("metrics/detect.json")


def run(params_file: Path, metrics_file: Path = METRICS, progress: bool = True) -> dict:
    params = load_params(params_file)
    root = params_file.parent
    cfg = params.detect
    train = root / params.curate.out / "train"
    if not train.is_dir():
        raise ParamsError(f"{params_file}: curate.out: {train} does not exist; run the curate stage first")
    shards = sorted(train.glob("*.tar"))
    checkpoint = root / params.detector.checkpoint
    if not checkpoint.is_file():
        raise ParamsError(
            f"{params_file}: detector.checkpoint: {checkpoint} does not exist; run the weights stage first"
        )
    model = yolo.load(params.detector.model, str(checkpoint), cfg.imgsz, cfg.device)
    try:
        classes = model.class_ids(cfg.classes)
    except ValueError as err:
        raise ParamsError(f"{params_file}: detect.classes: {err}") from None
    settings = Settings(
        conf=cfg.conf,
        iou=cfg.iou,
        classes=tuple(classes) if classes is not None else None,
        max_regions=cfg.max_regions,
        min_area_fraction=cfg.min_area_fraction,
        batch_size=cfg.batch_size,
    )
    start = time.perf_counter()
    metrics = detect(shards, root / cfg.out, root / cfg.scratch, model, settings, cfg.workers, progress)
    seconds = time.perf_counter() - start
    write_json(root / metrics_file, metrics)
    summary = {k: metrics[k] for k in ("images", "regions", "rejects")}
    summary.update(seconds=round(seconds, 1), device=str(model.device), half=model.half)
    print(json.dumps(summary))
    return metrics
