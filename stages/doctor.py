"""`dclip doctor`: what this machine offers the pipeline, before hours are spent on it."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import runtime
from pipeline.config import load_params
from pipeline.disk import estimate
from pipeline.errors import ParamsError
from pipeline.models.clip import architecture

GIB = 2**30


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def disk_need(params_file: Path) -> dict:
    """The disk the params' run will need (pipeline/disk.py: an upper bound) against the free disk;
    an unreadable params file is said, not fatal: the rest of the report still helps."""
    try:
        params = load_params(params_file, only=("clip", "curate", "detect", "embed"))
    except ParamsError as err:
        return {"params": str(params_file), "error": str(err).splitlines()[0]}
    config = architecture(params.clip.model)
    width = int(config.get("embed_dim", 0))
    context = int(config.get("text_cfg", {}).get("context_length", 77))
    regions = params.embed.max_regions - 1 if params.embed.max_regions else params.detect.max_regions
    need = estimate(
        sum(params.curate.mix.model_dump().values()), params.curate.image_size, width, context, regions
    )
    free = shutil.disk_usage(params_file.parent).free
    return {
        "params": str(params_file),
        "pairs": need.pairs,
        "curated_gib": round(need.curated_bytes / GIB, 2),
        "embed_cache_gib": round(need.embed_bytes / GIB, 2),
        "scratch_gib": round(need.scratch_bytes / GIB, 2),
        "need_gib": round(need.total_bytes / GIB, 2),
        "need_with_copying_dvc_cache_gib": round(need.with_dvc_cache() / GIB, 2),
        "fits": free >= need.total_bytes,
        "bytes": {
            "curated": need.curated_bytes,
            "embed_cache": need.embed_bytes,
            "scratch": need.scratch_bytes,
        },
    }


def report(root: Path, params_file: Path | None = None) -> dict:
    """torch and its CUDA build, the NVIDIA driver, the GPUs, what `device: auto` picks (and why
    not a GPU), CPU threads; free disk where the outputs go, what data/ holds already, and what the
    params' run will need."""
    free = shutil.disk_usage(root).free
    params_file = params_file or root / "params.yaml"
    return {
        **runtime.describe(),
        "disk_free_gib": round(free / GIB, 1),
        "data_gib": round(folder_bytes(root / "data") / GIB, 2),
        "disk_needed": disk_need(params_file) if params_file.is_file() else None,
    }
