"""Stage `world` (demo/dvc.yaml): generate the demo world's raw datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import parallel
from pipeline.config import load_params
from pipeline.demo.world.generate import generate_world


def run(params_file: Path) -> None:
    params = load_params(params_file)
    out = params_file.parent / params.world.out
    start = time.perf_counter()
    summary = generate_world(params.world, out, parallel.count(params.runtime.workers))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), **summary["coco"]}))
