"""Stage `evaluate@<model>` (dvc.yaml): Karpathy val and test retrieval, zero-shot classification
and the probe of one CLIP checkpoint; metrics/<model>.json for `dvc metrics`,
metrics/recall/<model>.csv for `dvc plots`, and metrics/queries/<model>.parquet: every query's
outcome, which the study's intervals and paired differences are computed from."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import time
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from pipeline import parallel
from pipeline.backend import Backend
from pipeline.config import Clip, ParamsError, load_params, looks_like_path
from pipeline.evaluate import (
    Encodes,
    RemoteSetEncoder,
    SetEncoder,
    Worker,
    curve_rows,
    evaluate,
    images_per_second,
    load_encoder,
    queries_table,
)
from pipeline.tables import write_table
from stages.outputs import METRICS_DIR, write_record

# Set sizes, chance levels and the probe's text-side cosines: to metrics/info/<model>.json.
INFO_KEYS = frozenset({"images", "captions", "classes", "templates", "items", "chance", "text_cosine"})
# Where a model's checkpoint is unless --weights says.
DEFAULT_WEIGHTS = {"base": lambda p: p.clip.checkpoint, "student": lambda p: p.distill.out}
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def weights_for(model: str, params, weights: str | None) -> str:
    if weights is not None:
        return weights
    if model in DEFAULT_WEIGHTS:
        return DEFAULT_WEIGHTS[model](params)
    raise ParamsError(
        f"model {model!r}: no default checkpoint ({', '.join(DEFAULT_WEIGHTS)} have one); give --weights"
    )


def run(
    params_file: Path,
    model: str = "base",
    weights: str | None = None,
    metrics_dir: Path = METRICS_DIR,
    progress: bool = True,
) -> dict:
    if not _NAME.fullmatch(model):
        raise ParamsError(f"model name {model!r}: letters, digits, '_' and '-' only (it names files)")
    params = load_params(params_file)
    root = params_file.parent
    cfg = params.evaluate
    weights = weights_for(model, params, weights)
    # The same checks as clip.pretrained: an open_clip tag for the architecture, or a file.
    try:
        Clip.model_validate({"model": params.clip.model, "pretrained": weights}, context={"base_dir": root})
    except ValidationError as err:
        message = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ParamsError(f"weights of model {model!r}: {message}") from None
    rt = params.runtime
    resolved = str(root / weights) if looks_like_path(weights) else weights
    load = partial(load_encoder, params.clip.model, resolved, rt.device)
    backend = Backend.of(rt)
    with contextlib.ExitStack() as stack:
        encoder: Encodes
        if backend.kind == "local":
            encoder = SetEncoder(load(), rt.batch_size.evaluate, parallel.count(rt.workers), progress)
        else:  # every Ray worker loads its own copy, on its own device
            workers = stack.enter_context(
                backend.start(partial(Worker, load, rt.batch_size.evaluate, rt.workers))
            )
            encoder = RemoteSetEncoder(workers, rt.batch_size.evaluate, progress)
        start = time.perf_counter()
        result = evaluate(encoder, root / params.curate.out, cfg.datasets, cfg.prompts)
        seconds = time.perf_counter() - start
    out = root / metrics_dir
    write_record(out, model, result.metrics, INFO_KEYS, sort_keys=False)
    if result.curves:
        _write_csv(out / "recall" / f"{model}.csv", curve_rows(result.curves))
    table = queries_table(result)
    write_table(out / "queries" / f"{model}.parquet", table, table.schema)
    summary = {
        "model": model,
        "weights": weights,
        "backend": backend.kind,
        "device": str(encoder.encoder.device) if isinstance(encoder, SetEncoder) else "ray workers",
        "seconds": round(seconds, 1),
        "images_per_second": round(images_per_second(result), 1),
        "seconds_per_set": result.seconds,
    }
    print(json.dumps(summary))
    return result.metrics


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
