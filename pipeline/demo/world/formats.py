"""Writers of the real raw formats, byte-for-byte deterministic.

Each writer produces what the real dataset ships, so that the project's readers are exercised on
the formats they will meet on a paper run: COCO captions JSON, Karpathy split JSON, img2dataset
WebDataset shards with their parquet and stats, CIFAR python pickles, YOLO label files.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def karpathy_tokens(raw: str) -> list[str]:
    """Karpathy's tokens: lower-case words without punctuation."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def karpathy_images(entries: list[dict], dataset: str) -> dict:
    """`entries`: dicts with split, filename, captions (and filepath, cocoid for COCO)."""
    images, sentid = [], 0
    for imgid, e in enumerate(entries):
        sentences, sentids = [], []
        for raw in e["captions"]:
            sentences.append({"tokens": karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentids.append(sentid)
            sentid += 1
        image = {"sentids": sentids, "imgid": imgid, "sentences": sentences, "split": e["split"]}
        if "filepath" in e:
            image["filepath"] = e["filepath"]
        image["filename"] = e["filename"]
        if "cocoid" in e:
            image["cocoid"] = e["cocoid"]
        images.append(image)
    return {"images": images, "dataset": dataset}


COCO_LICENSES = [
    {
        "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
        "id": 1,
        "name": "Attribution-NonCommercial-ShareAlike License",
    },
    {
        "url": "http://creativecommons.org/licenses/by-nc/2.0/",
        "id": 2,
        "name": "Attribution-NonCommercial License",
    },
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
]


def coco_captions(images: list[dict], annotations: list[dict], year: int) -> dict:
    """COCO captions schema: info, licenses, images (id, file_name, width, height, ...), annotations."""
    return {
        "info": {
            "description": f"COCO {year} Dataset (dclip demo world)",
            "url": "https://dclip.invalid/demo-world",
            "version": "1.0",
            "year": year,
            "contributor": "dclip demo world generator",
            "date_created": f"{year}/09/01",
        },
        "licenses": COCO_LICENSES,
        "images": images,
        "annotations": annotations,
    }


def clip_benchmark_coco_test(entries: list[dict], sizes: dict[int, tuple[int, int]]) -> dict:
    """CLIP_benchmark's coco_test_karpathy.json: COCO's captions_val2014.json schema cut down to
    the Karpathy test images, file names without a folder, images sorted by id."""
    test = sorted((e for e in entries if e["split"] == "test"), key=lambda e: e["cocoid"])
    images: list[dict] = []
    annotations: list[dict] = []
    for e in test:
        width, height = sizes[e["cocoid"]]
        images.append({"id": e["cocoid"], "file_name": e["filename"], "width": width, "height": height})
        for text in e["captions"]:
            annotations.append({"image_id": e["cocoid"], "id": len(annotations) + 1, "caption": text})
    return coco_captions(images, annotations, 2014)


def write_clip_benchmark_flickr_test(path: Path, entries: list[dict]) -> None:
    """CLIP_benchmark's flickr30k_test_karpathy.txt: a pandas-written CSV, header image,caption,
    one line per caption of every Karpathy test image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["image", "caption"])
        for e in entries:
            if e["split"] == "test":
                out.writerows([e["filename"], text] for text in e["captions"])


class TarShard:
    """A tar file whose bytes depend only on its members: fixed mtime, owner and mode."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


IMG2DATASET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression="snappy")


# --- CIFAR: Python 2 pickles -------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did: text and bytes become py2 `str` (BINSTRING), and numpy
    arrays refer to `numpy.core.multiarray._reconstruct`. Loaded with encoding="bytes" the keys
    are bytes (b"data"), with encoding="latin1" they are str ("data") — exactly as with the real
    CIFAR files, so either style of reader works."""

    # typeshed types this table's functions as taking an Unpickler; they take the pickler.
    dispatch: ClassVar[dict[type, Callable[[Any, Any], None]]] = dict(pickle._Pickler.dispatch)

    if TYPE_CHECKING:  # pickle._Pickler's undocumented internals, absent from typeshed's stub

        def write(self, data: bytes, /) -> None: ...

        def save(self, obj: object) -> None: ...

        def memoize(self, obj: object) -> None: ...

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def _save_ndarray(self, arr: np.ndarray):
        # The reduce tuple numpy 1.x wrote under Python 2, spelled out.
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.write(pickle.GLOBAL + b"numpy\nndarray\n")
        self.save((0,))
        self.save(b"b")
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        state = (1, arr.shape, arr.dtype, False, np.ascontiguousarray(arr).tobytes())
        self.save(state)
        self.write(pickle.BUILD)

    dispatch[np.ndarray] = _save_ndarray

    def _save_dtype(self, dt: np.dtype):
        self.write(pickle.GLOBAL + b"numpy\ndtype\n")
        self.save((dt.str[1:], False, True))
        self.write(pickle.REDUCE)
        self.save((3, dt.byteorder, None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)

    dispatch[type(np.dtype("u1"))] = _save_dtype


def write_py2_pickle(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def cifar_rows(images: list[np.ndarray]) -> np.ndarray:
    """N×32×32×3 images to CIFAR's N×3072 rows: the red plane, then green, then blue."""
    if not images:
        return np.zeros((0, 3072), np.uint8)
    return np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.uint8)


# --- YOLO labels -----------------------------------------------------------------------------


def yolo_label(boxes: list[tuple[int, int, int, int]], classes: list[int], width: int, height: int) -> str:
    """One line per box: class x_centre y_centre width height, normalised to [0, 1]."""
    lines = []
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        lines.append(
            f"{c} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
        )
    return "\n".join(lines) + ("\n" if lines else "")
