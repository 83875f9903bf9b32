"""`dclip regions-quality`: what the detector's crops carry in the base CLIP's space, by context
margin (pipeline/region_quality.py); written to metrics/regions_quality.json."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import region_quality
from pipeline.config import load_params
from pipeline.models.clip import create
from stages.outputs import require, write_json

OUT = Path("metrics/regions_quality.json")


def run(params_file: Path, images: int, margins: list[float], seed: int = 0) -> dict:
    params = load_params(params_file, only=("clip", "curate", "detect"))
    root = params_file.parent
    curated, table = root / params.curate.out, root / params.detect.out
    weights = root / params.clip.checkpoint
    require(params_file, [(table, "detect"), (curated / "train.parquet", "curate"), (weights, "weights")])
    sample, names = region_quality.sample_images(table, curated / "train.parquet", images, seed)
    model, preprocess, tokenizer = create(params.clip.model, str(weights))
    result = {
        "model": params.clip.model,
        "weights": str(params.clip.checkpoint),
        "seed": seed,
        **region_quality.measure(model.eval(), preprocess, tokenizer, curated, sample, names, margins),
    }
    write_json(root / OUT, result)
    print(json.dumps(result))
    return result
