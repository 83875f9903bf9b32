"""Stage `embed` (dvc.yaml): CLIP embeddings of every training pair into data/embeddings/."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import ParamsError, load_params
from pipeline.embed import Settings, embed, load_encoder
from stages.outputs import write_json

METRICS = Path("metrics/embed.json")


def run(params_file: Path, metrics_file: Path = METRICS, progress: bool = True) -> dict:
    params = load_params(params_file)
    root = params_file.parent
    cfg = params.embed
    curated = root / params.curate.out
    train, manifest, regions = curated / "train", curated / "train.parquet", root / params.detect.out
    for path, stage in ((train, "curate"), (manifest, "curate"), (regions, "detect")):
        if not path.exists():
            raise ParamsError(f"{params_file}: {path} does not exist; run the {stage} stage first")
    checkpoint = root / params.clip.checkpoint
    if not checkpoint.is_file():
        raise ParamsError(
            f"{params_file}: clip.checkpoint: {checkpoint} does not exist; run the weights stage first"
        )
    encoder = load_encoder(params.clip.model, str(checkpoint), cfg.device)
    settings = embed_settings(cfg)
    start = time.perf_counter()
    metrics = embed(
        sorted(train.glob("*.tar")),
        manifest,
        regions,
        root / cfg.out,
        root / cfg.scratch,
        encoder,
        settings,
        cfg.workers,
        progress,
    )
    seconds = time.perf_counter() - start
    write_json(root / metrics_file, metrics)
    summary = {k: metrics[k] for k in ("pairs", "images", "regions", "rejects")}
    summary.update(seconds=round(seconds, 1), device=str(encoder.device), amp=encoder.amp)
    print(json.dumps(summary))
    return metrics


def embed_settings(cfg) -> Settings:
    """The embed computation's settings from the `embed` params section."""
    return Settings(
        context_margin=cfg.context_margin,
        weights=cfg.weights,
        max_regions=cfg.max_regions,
        batch_size=cfg.batch_size,
    )
