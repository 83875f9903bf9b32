"""Files on disk: written atomically, identified by content.

A crash never leaves a half file or folder that looks whole: everything is written under a
temporary name beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # in the name of every unfinished file or folder: `.<name>.tmp-<pid>`


def file_digest(path: Path | str) -> str:
    """sha256 hex of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` when the block ends and is
    removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; it replaces `path` (folder and all) when
    the block ends and is removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_unfinished(folder: Path) -> None:
    """Remove what a killed run left half written directly in `folder`."""
    for stale in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else ():
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """torch.save to `path`, atomically. Saved through an open file object, not a path, so the bytes
    do not depend on the file's name (torch names the archive's folder after a path, "archive" for
    a file object): the same object gives the same file, and DVC the same hash. Streamed to disk:
    no in-memory copy of a checkpoint that may be as large as the model and its optimiser."""
    import torch

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
