"""`dclip demo train-models`: train the demo's small CLIP and YOLO once; their weights and JSON
cards are committed under demo/weights/."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from pipeline import demo_models as dm
from pipeline.config import load_params
from pipeline.models.clip import create, save_checkpoint
from pipeline.world.generate import generate_pretrain_split, pretrain_summary

WEIGHTS = Path("demo/weights")
CLIP_FILE = WEIGHTS / f"clip-{dm.CLIP_MODEL}.pt"
YOLO_FILE = WEIGHTS / "yolo-demo-v8n.pt"
YOLO_VAL_IMAGES = 300


def _card(path: Path, card: dict) -> None:
    card = {
        "command": shlex.join(["dclip", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu",
        **card,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


CURATED_EVAL_IMAGES = 1000  # fresh curated-domain scenes for the card's headroom figure


def run(
    params_file: Path,
    work: Path,
    train_images: int,
    val_images: int,
    clip_epochs: int,
    yolo_epochs: int,
    yolo_images: int,
    single_object_fraction: float,
    hard_fraction: float,
    only: str,
    seed: int,
) -> None:
    # Only the world section: the other sections point at the weights this command makes.
    cfg = load_params(params_file, only=("world",)).world
    start = time.perf_counter()
    n_total = train_images + val_images
    if only in ("both", "clip"):
        split = work / "pretrain-web"
        wanted = pretrain_summary(cfg, train_images, val_images, single_object_fraction, "web")
        _ensure_split(cfg, split, wanted, train_images, val_images, single_object_fraction, "web")
        data = {
            "split": "web-domain pretraining split (seed stream of its own; no pipeline split uses it)",
            "domain": "web: object-centric images, alt-text captions (pipeline/world/scene.py)",
            "world_seed": cfg.seed,
            "train_images": train_images,
            "single_object_train_images": wanted["single_object_train"],
            "val_images": val_images,
        }
        model, train = dm.train_clip(split, epochs=clip_epochs, seed=seed, hard_fraction=hard_fraction)
        _, preprocess, tokenizer = create(dm.CLIP_MODEL, "none")
        val_imgs, val_caps = dm.load_split(split, "val", preprocess)
        cls_imgs, cls_labels, names = dm.class_images(cfg, preprocess, per_class=5, offset=n_total)
        quality = dm.evaluate_clip(model, tokenizer, val_imgs, val_caps, cls_imgs, cls_labels, names)
        cur_imgs, cur_caps = dm.curated_images(cfg, preprocess, CURATED_EVAL_IMAGES, offset=5_000_000)
        quality["curated_domain_retrieval"] = dm.retrieval_quality(model, tokenizer, cur_imgs, cur_caps)
        save_checkpoint(model, CLIP_FILE)
        _card(
            CLIP_FILE,
            {
                "model": dm.CLIP_MODEL,
                "seed": seed,
                "data": data,
                "training": train,
                "quality": quality,
                "quality_notes": {
                    "retrieval": "fresh web-domain images, alt-text captions (its own domain)",
                    "zero_shot": "fresh web-domain single-object images, as the zero-shot sets are drawn",
                    "curated_domain_retrieval": "fresh curated-domain scenes, COCO-style captions: "
                    "what the pipeline adapts it to",
                },
                "size_mb": round(CLIP_FILE.stat().st_size / 2**20, 1),
            },
        )
        print(json.dumps(quality))
    if only in ("both", "yolo"):
        # The detector learns the curated domain itself, as a real YOLO is trained on COCO.
        yolo_split = work / "pretrain-yolo"
        wanted = pretrain_summary(cfg, yolo_images, YOLO_VAL_IMAGES, 0.0, "curated")
        _ensure_split(cfg, yolo_split, wanted, yolo_images, YOLO_VAL_IMAGES, 0.0, "curated")
        best, train = dm.train_yolo(
            yolo_split / "data.yaml", work / "runs", "yolov8n.yaml", yolo_epochs, 160, 32, seed
        )
        WEIGHTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, YOLO_FILE)
        fresh = dm.detector_recall(YOLO_FILE, cfg, n_images=300, offset=n_total + 1000, imgsz=160)
        _card(
            YOLO_FILE,
            {
                "model": "yolov8n.yaml, one class per shape",
                "seed": seed,
                "data": {
                    "split": "curated-domain split (seed stream of its own; no pipeline split uses it)",
                    "world_seed": cfg.seed,
                    "yolo_train_images": yolo_images,
                    "yolo_val_images": YOLO_VAL_IMAGES,
                },
                "training": train,
                "quality_fresh_images": fresh,
                "size_mb": round(YOLO_FILE.stat().st_size / 2**20, 1),
            },
        )
        print(json.dumps({**train, **fresh}))
    print(f"done in {time.perf_counter() - start:.0f} s")


def _ensure_split(cfg, folder: Path, wanted: dict, n_train: int, n_val: int, single: float, domain: str):
    """Generate the split unless the folder already holds exactly this one."""
    if not (folder / "split.json").exists() or json.loads((folder / "split.json").read_text()) != wanted:
        generate_pretrain_split(cfg, folder, n_train, n_val, single, domain=domain)
