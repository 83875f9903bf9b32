"""The demo's own small YOLO, trained from scratch by ultralytics' own trainer on the world's
curated-domain pretraining split (one class per shape), as a real YOLO is trained on COCO itself;
cards.py measures it on fresh images."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.models.detector import prepare_ultralytics


def train_yolo(
    data_yaml: Path, work: Path, arch: str, epochs: int, imgsz: int, batch: int, seed: int
) -> tuple[Path, dict]:
    from ultralytics import YOLO

    prepare_ultralytics()
    start = time.perf_counter()
    model = YOLO(arch)
    model.train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        workers=2,
        device="cpu",
        seed=seed,
        deterministic=True,
        project=str(work.resolve()),  # a relative project lands under ultralytics' runs/ folder
        name="yolo",
        exist_ok=True,
        plots=False,
        amp=False,
        optimizer="AdamW",
        lr0=0.002,
        cos_lr=True,
        close_mosaic=max(1, epochs // 4),
        verbose=False,
    )
    if model.trainer is None:
        raise RuntimeError("ultralytics trained no model")
    best = Path(model.trainer.best)
    metrics = YOLO(str(best)).val(
        data=str(data_yaml),
        imgsz=imgsz,
        batch=batch,
        device="cpu",
        plots=False,
        verbose=False,
        project=str(work.resolve()),
        name="val",
        exist_ok=True,
    )
    return best, {
        "arch": arch,
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "seconds": round(time.perf_counter() - start, 1),
        "val_precision": round(float(metrics.box.mp), 4),
        "val_recall": round(float(metrics.box.mr), 4),
        "val_mAP50": round(float(metrics.box.map50), 4),
        "val_mAP50_95": round(float(metrics.box.map), 4),
    }
