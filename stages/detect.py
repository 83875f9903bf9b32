"""Stage `detect` (dvc.yaml): YOLO regions of every training image into data/regions.parquet."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pipeline.backend import Backend
from pipeline.config import load_params, settings
from pipeline.detect import Settings, detect
from pipeline.errors import ParamsError
from pipeline.models import detector as yolo
from pipeline.shards import verify_shards
from stages.outputs import info_path, require, write_json

INFO = info_path("detect")  # counts only: no figure of the model, so no metrics file


def run(params_file: Path, info_file: Path = INFO, progress: bool = True) -> dict:
    params = load_params(params_file)
    root = params_file.parent
    cfg, rt = params.detect, params.runtime
    train, manifest = root / params.curate.out / "train", root / params.curate.out / "train.parquet"
    checkpoint = root / params.detector.checkpoint
    require(params_file, [(train, "curate"), (manifest, "curate"), (checkpoint, "weights")])
    shards = verify_shards(train, manifest)  # a short or cut shard is named before any work
    model: yolo.Detector | Callable[[], yolo.Detector]
    model = yolo.load(params.detector.model, str(checkpoint), cfg.imgsz, rt.device)
    try:
        classes = model.class_ids(cfg.classes)
    except ValueError as err:
        raise ParamsError(f"{params_file}: detect.classes: {err}") from None
    kept = tuple(classes) if classes is not None else None
    step = settings(Settings, cfg, classes=kept, batch_size=rt.batch_size.detect)
    backend = Backend.of(rt)
    if backend.kind == "ray":  # each worker loads its own copy, on its own device
        model = partial(yolo.load, params.detector.model, str(checkpoint), cfg.imgsz, rt.device)
    start = time.perf_counter()
    metrics = detect(
        shards, root / cfg.out, root / rt.scratch / "detect", model, step, rt.workers, progress, backend
    )
    seconds = time.perf_counter() - start
    write_json(root / info_file, metrics)
    summary = {k: metrics[k] for k in ("images", "regions", "rejects")}
    where = f"{model.device} half={model.half}" if isinstance(model, yolo.Detector) else "ray workers"
    summary.update(seconds=round(seconds, 1), backend=backend.kind, device=where)
    print(json.dumps(summary))
    return metrics
