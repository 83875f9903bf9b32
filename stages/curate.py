"""Stage `curate` (dvc.yaml): raw COCO / Flickr30k / CC into training shards with the Karpathy
val and test images kept out; the Karpathy test sets and zero-shot sets as evaluation shards."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import parallel
from pipeline.backend import Backend
from pipeline.captions import clip_token_counter
from pipeline.config import Params, load_params, settings
from pipeline.curate import Settings, SourcePaths, curate
from pipeline.errors import ParamsError
from stages.outputs import info_path, write_json

INFO = info_path("curate")  # counts only: no figure of the model, so no metrics file


def check_raw_inputs(
    params: Params, params_file: Path, made_by_world: bool, root: Path | None = None
) -> None:
    """Every raw input the sources name exists, or a ParamsError names each that does not.
    With `made_by_world`, inputs inside world.out are left out: the demo's world stage makes them
    (what `dclip params check` wants before `dvc repro`); the curate stage itself needs them all.
    Paths are relative to `root`, by default the params file's folder."""
    root = root if root is not None else params_file.parent
    missing = SourcePaths.resolve(params.sources, root, params.curate.mix).missing()
    if made_by_world:  # (world.out is read only here: the curate stage does not list it)
        world = (root / params.world.out).resolve()
        missing = [(key, path) for key, path in missing if not path.resolve().is_relative_to(world)]
    if missing:
        raise ParamsError(
            f"{params_file}: {len(missing)} raw input(s) not found (the curate stage reads them)\n"
            + "\n".join(f"  {key}: {path} does not exist" for key, path in missing)
        )


def run(params_file: Path, info_file: Path = INFO, progress: bool = True) -> dict:
    params = load_params(params_file)
    root = params_file.parent
    check_raw_inputs(params, params_file, made_by_world=False)
    paths = SourcePaths.resolve(params.sources, root, params.curate.mix)
    count_tokens, context = clip_token_counter(params.clip.model)
    max_tokens = params.curate.caption.max_tokens or context
    if max_tokens > context:
        raise ParamsError(
            f"{params_file}: curate.caption.max_tokens: {max_tokens} exceeds the context length of "
            f"clip.model {params.clip.model!r} ({context}); longer captions would be cut by the tokenizer"
        )
    start = time.perf_counter()
    cfg = params.curate
    step = settings(Settings, cfg, mix=cfg.mix.model_dump(), max_tokens=max_tokens)
    rt = params.runtime
    metrics = curate(
        step, paths, root / cfg.out, count_tokens, parallel.count(rt.workers), progress, Backend.of(rt)
    )
    seconds = time.perf_counter() - start
    write_json(root / info_file, metrics)
    pairs = {s: m["kept_pairs"] for s, m in metrics["train"].items() if s != "total"}
    shards = metrics["train"]["total"]["shards"]
    print(json.dumps({"seconds": round(seconds, 1), "backend": rt.backend, "pairs": pairs, "shards": shards}))
    return metrics
