"""`dclip demo train-models`: train the demo's small CLIP and YOLO once; their weights and JSON
cards are committed under demo/weights/. `dclip demo cards`: measure the committed weights again
on their cards' held-out images and rewrite the cards' quality fields."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline import parallel
from pipeline.config import World, load_params
from pipeline.demo import cards as quality_of
from pipeline.demo.cards import ClipHeldOut, DetectorHeldOut, WorldDraw
from pipeline.demo.clip_training import CLIP_MODEL, train_clip
from pipeline.demo.pretrain import generate_pretrain_split, pretrain_summary
from pipeline.demo.yolo_training import train_yolo
from pipeline.errors import InputError
from pipeline.models.clip import Encoder, create, load_encoder, save_checkpoint

WEIGHTS = Path("demo/weights")
CLIP_FILE = WEIGHTS / f"clip-{CLIP_MODEL}.pt"
YOLO_FILE = WEIGHTS / "yolo-demo-v8n.pt"
YOLO_VAL_IMAGES = 300
CARDS_COMMAND = "dclip demo cards"
CLIP_QUALITY_NOTES = {
    "retrieval": "fresh web-domain images, alt-text captions (its own domain)",
    "zero_shot": "fresh web-domain single-object images, as the zero-shot sets are drawn",
    "curated_domain_retrieval": "fresh curated-domain scenes, COCO-style captions: "
    "what the pipeline adapts it to",
}


def _write_card(path: Path, card: dict) -> None:
    path.with_suffix(".json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")


def _card(path: Path, card: dict) -> None:
    _write_card(
        path,
        {
            "command": shlex.join(["dclip", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu",
            **card,
        },
    )


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
    params = load_params(params_file, only=("world", "runtime"))
    cfg, workers = params.world, parallel.count(params.runtime.workers)
    draw = WorldDraw.of(cfg)
    start = time.perf_counter()
    if only in ("both", "clip"):
        split = work / "pretrain-web"
        wanted = pretrain_summary(cfg, train_images, val_images, single_object_fraction, "web")
        _ensure_split(cfg, split, wanted, train_images, val_images, single_object_fraction, "web", workers)
        data = {
            "split": "web-domain pretraining split (seed stream of its own; no pipeline split uses it)",
            "domain": "web: object-centric images, alt-text captions (pipeline/demo/world/scene.py)",
            "world_seed": cfg.seed,
            "train_images": train_images,
            "single_object_train_images": wanted["single_object_train"],
            "val_images": val_images,
        }
        model, train = train_clip(split, epochs=clip_epochs, seed=seed, hard_fraction=hard_fraction)
        _, preprocess, tokenizer = create(CLIP_MODEL, "none")
        held = ClipHeldOut.after_split(draw, train_images, val_images)
        encoder = Encoder(model, preprocess, tokenizer, torch.device("cpu"))
        quality = quality_of.clip_quality(encoder, held, workers)
        save_checkpoint(model, CLIP_FILE)
        _card(
            CLIP_FILE,
            {
                "model": CLIP_MODEL,
                "seed": seed,
                "data": data,
                "training": train,
                "metrics": quality_of.METRICS,
                "held_out": quality_of.as_dict(held),
                "quality": quality,
                "quality_notes": CLIP_QUALITY_NOTES,
                "size_mb": round(CLIP_FILE.stat().st_size / 2**20, 1),
            },
        )
        print(json.dumps(quality))
    if only in ("both", "yolo"):
        # The detector learns the curated domain itself, as a real YOLO is trained on COCO.
        yolo_split = work / "pretrain-yolo"
        wanted = pretrain_summary(cfg, yolo_images, YOLO_VAL_IMAGES, 0.0, "curated")
        _ensure_split(cfg, yolo_split, wanted, yolo_images, YOLO_VAL_IMAGES, 0.0, "curated", workers)
        best, train = train_yolo(
            yolo_split / "data.yaml", work / "runs", "yolov8n.yaml", yolo_epochs, 160, 32, seed
        )
        WEIGHTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, YOLO_FILE)
        detector_held = DetectorHeldOut.after_split(draw, train_images, val_images)
        fresh = quality_of.detector_quality(YOLO_FILE, detector_held, workers)
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
                "metrics": quality_of.DETECTOR_METRICS,
                "held_out": quality_of.as_dict(detector_held),
                "quality_fresh_images": fresh,
                "size_mb": round(YOLO_FILE.stat().st_size / 2**20, 1),
            },
        )
        print(json.dumps({**train, **fresh}))
    print(f"done in {time.perf_counter() - start:.0f} s")


def _ensure_split(
    cfg: World, folder: Path, wanted: dict, n_train: int, n_val: int, single: float, domain: str, workers: int
) -> None:
    """Generate the split unless the folder already holds exactly this one."""
    if not (folder / "split.json").exists() or json.loads((folder / "split.json").read_text()) != wanted:
        generate_pretrain_split(cfg, folder, n_train, n_val, single, domain=domain, workers=workers)


# --- dclip demo cards ----------------------------------------------------------------------------


def cards(params_file: Path, weights: Path = WEIGHTS, only: str = "both") -> dict[str, dict]:
    """Measure the weights in `weights` again on the fresh images their cards name, with the
    project's metric definitions, and rewrite each card's quality fields; the training
    provenance (command, machine, seed, data, training, size) is kept. A card written before
    cards named their images (`held_out`) is measured on the images its split implies, drawn
    with the params' world settings, which must have the card's world seed. Returns the new
    quality of each card, by file name."""
    params = load_params(params_file, only=("world", "runtime"))
    cfg, workers = params.world, parallel.count(params.runtime.workers)
    out = {}
    if only in ("both", "clip"):
        path = weights / CLIP_FILE.name
        card = _read_card(path)
        if "held_out" in card:
            held = ClipHeldOut.from_dict(card["held_out"])
        else:
            draw = _world_of_card(cfg, card, path)
            held = ClipHeldOut.after_split(draw, card["data"]["train_images"], card["data"]["val_images"])
        encoder = load_encoder(card["model"], str(path), "cpu")
        quality = quality_of.clip_quality(encoder, held, workers)
        _write_card(
            path, _with_quality(card, "quality", quality, quality_of.METRICS, quality_of.as_dict(held))
        )
        out[path.with_suffix(".json").name] = quality
    if only in ("both", "yolo"):
        path = weights / YOLO_FILE.name
        card = _read_card(path)
        if "held_out" in card:
            detector_held = DetectorHeldOut.from_dict(card["held_out"])
        else:
            draw = _world_of_card(cfg, card, path)
            detector_held = DetectorHeldOut.after_split(
                draw, card["data"]["train_images"], card["data"]["val_images"]
            )
        fresh = quality_of.detector_quality(path, detector_held, workers)
        _write_card(
            path,
            _with_quality(
                card,
                "quality_fresh_images",
                fresh,
                quality_of.DETECTOR_METRICS,
                quality_of.as_dict(detector_held),
            ),
        )
        out[path.with_suffix(".json").name] = fresh
    return out


def _read_card(weights_file: Path) -> dict:
    card_file = weights_file.with_suffix(".json")
    if not weights_file.is_file() or not card_file.is_file():
        raise InputError(f"{weights_file}: weights or their card {card_file.name} not found")
    return json.loads(card_file.read_text(encoding="utf-8"))


def _world_of_card(cfg: World, card: dict, path: Path) -> WorldDraw:
    seed = card.get("data", {}).get("world_seed")
    if seed != cfg.seed:
        raise InputError(
            f"{path.with_suffix('.json')}: its images come from world seed {seed}, "
            f"but the params' world.seed is {cfg.seed}"
        )
    return WorldDraw.of(cfg)


def _with_quality(card: dict, key: str, quality: dict, definition: str, held_out: dict) -> dict:
    """The card with new quality under `key`, preceded by how and on what it was measured; every
    other field kept, in its place."""
    measured = {"quality_command": CARDS_COMMAND, "metrics": definition, "held_out": held_out}
    out: dict = {}
    for k, v in card.items():
        if k in measured:
            continue
        if k == key:
            out.update(measured)
            out[k] = quality
        else:
            out[k] = v
    if key not in out:
        out.update(measured)
        out[key] = quality
    return out
