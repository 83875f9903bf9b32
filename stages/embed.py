"""Stage `embed` (dvc.yaml): CLIP embeddings of every training pair into data/embeddings/."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from pipeline.backend import Backend
from pipeline.config import load_params, settings
from pipeline.embed import Settings, embed
from pipeline.models.clip import Encoder, load_encoder
from pipeline.shards import verify_shards
from stages.outputs import info_path, require, write_json

INFO = info_path("embed")  # counts only: no figure of the model, so no metrics file


def run(params_file: Path, info_file: Path = INFO, progress: bool = True) -> dict:
    params = load_params(params_file)
    root = params_file.parent
    cfg, rt = params.embed, params.runtime
    curated = root / params.curate.out
    train, manifest, regions = curated / "train", curated / "train.parquet", root / params.detect.out
    checkpoint = root / params.clip.checkpoint
    require(
        params_file, [(train, "curate"), (manifest, "curate"), (regions, "detect"), (checkpoint, "weights")]
    )
    backend = Backend.of(rt)
    load = partial(load_encoder, params.clip.model, str(checkpoint), rt.device)
    encoder = load() if backend.kind == "local" else load  # Ray: each worker loads its own copy
    step = settings(Settings, cfg, batch_size=rt.batch_size.embed)
    start = time.perf_counter()
    metrics = embed(
        verify_shards(train, manifest),  # a short or cut shard is named before any work
        manifest,
        regions,
        root / cfg.out,
        root / rt.scratch / "embed",
        encoder,
        step,
        rt.workers,
        progress,
        backend,
    )
    seconds = time.perf_counter() - start
    write_json(root / info_file, metrics)
    summary = {k: metrics[k] for k in ("pairs", "images", "regions", "rejects")}
    where = f"{encoder.device} amp={encoder.amp}" if isinstance(encoder, Encoder) else "ray workers"
    summary.update(seconds=round(seconds, 1), backend=backend.kind, device=where)
    print(json.dumps(summary))
    return metrics
