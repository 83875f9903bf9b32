"""CIFAR-10 / CIFAR-100 "python version": Python 2 pickles of dicts, images as N×3072 uint8 rows."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.sources._json import type_name
from pipeline.sources.errors import SourceError

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}
META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
LABELS = {"cifar10": "labels", "cifar100": "fine_labels"}

# A pickle can run any code it names; CIFAR's name only numpy's array reconstruction.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes an array's bytes at protocol 2 (a re-pickled copy)
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load(path: Path) -> dict[str, Any]:
    """A CIFAR pickle with str keys (Python 2 strings come back as bytes under encoding="bytes";
    a re-pickled copy may have str keys: both are accepted)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise SourceError(f"{path}: not a CIFAR pickle: {err}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _get(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise SourceError(f"{path}: {key}: missing")
    return batch[key]


def _classnames(path: Path, key: str) -> list[str]:
    names = _get(_load(path), key, path)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise SourceError(f"{path}: {key}: expected a list of strings, got {type_name(names)}")
    # "maple_tree" → "maple tree": the name a prompt needs.
    return [(n.decode("utf-8") if isinstance(n, bytes) else n).replace("_", " ") for n in names]


def _read_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, list[int]]:
    batch = _load(path)
    data = _get(batch, "data", path)
    is_rows = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (is_rows and data.shape[1] == 3072):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type_name(data)
        raise SourceError(f"{path}: data: expected a uint8 array of shape (N, 3072), got {got}")
    labels = _get(batch, label_key, path)
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"{len(labels)} labels" if isinstance(labels, list) else type_name(labels)
        raise SourceError(f"{path}: {label_key}: expected a list of {len(data)} labels, got {got}")
    for i, label in enumerate(labels):
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_classes:
            raise SourceError(
                f"{path}: {label_key}[{i}]: expected a class index below {n_classes}, got {label!r}"
            )
    # Each row: the red plane, then green, then blue, each 32×32 row-major → N×32×32×3.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def read_cifar(
    root: Path | str, name: Literal["cifar10", "cifar100"], split: Literal["test", "train"]
) -> tuple[list[str], np.ndarray, list[int]]:
    """(class names, uint8 images N×32×32×3, labels); CIFAR-100 gives its 100 fine labels.

    `root` holds cifar-10-batches-py/ or cifar-100-python/ (or is that folder itself)."""
    if (name, split) not in FILES:
        raise ValueError(f"unknown CIFAR set {name!r} / split {split!r}")
    root = Path(root)
    folder = root if root.name == FOLDERS[name] else root / FOLDERS[name]
    meta_file, names_key = META[name]
    classnames = _classnames(folder / meta_file, names_key)
    parts = [_read_batch(folder / f, LABELS[name], len(classnames)) for f in FILES[(name, split)]]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = [label for p in parts for label in p[1]]
    return classnames, images, labels
