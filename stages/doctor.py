"""`dclip doctor`: what this machine offers the pipeline, before hours are spent on it."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import runtime


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def report(root: Path) -> dict:
    """torch and its CUDA build, the NVIDIA driver, the GPUs, what `device: auto` picks (and why
    not a GPU), CPU threads; free disk where the outputs go, and what data/ holds already."""
    free = shutil.disk_usage(root).free
    return {
        **runtime.describe(),
        "disk_free_gib": round(free / 2**30, 1),
        "data_gib": round(folder_bytes(root / "data") / 2**30, 2),
    }
