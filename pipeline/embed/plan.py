"""Which pair encodes which image (from the curated manifest), and the detect rows of a shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.embed.tables import DETECT_COLUMNS, MANIFEST_COLUMNS, EmbedError


@dataclass(frozen=True)
class ShardPlan:
    """The pairs of one shard: their image, whether this pair encodes it (the image's first pair
    in shard order) and otherwise the shard (name) whose part holds it."""

    image: dict[str, str]
    home: dict[str, str]  # pair key → shard name of the image's first pair
    encodes: frozenset[str]

    def digest(self) -> str:
        spec = sorted((k, self.image[k], self.home[k], k in self.encodes) for k in self.image)
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


class Plan:
    """From the manifest (train.parquet): which pair encodes each image. Holds three string
    columns of the manifest, not embeddings."""

    def __init__(self, manifest: pa.Table):
        names = pc.replace_substring_regex(manifest.column("shard"), pattern=r"^.*/", replacement="")
        order = np.argsort(np.asarray(names.to_pylist(), dtype=object), kind="stable")
        self.keys = np.asarray(manifest.column("key").to_pylist(), dtype=object)[order]
        self.shards = np.asarray(names.to_pylist(), dtype=object)[order]
        self.images = np.asarray(manifest.column("image").to_pylist(), dtype=object)[order]
        _, first, inverse = np.unique(self.images.astype(str), return_index=True, return_inverse=True)
        self.first = first[inverse.reshape(-1)]  # row of each row's image's first pair
        self._rows: dict[str, list[int]] = {}
        for i, s in enumerate(self.shards.tolist()):
            self._rows.setdefault(s, []).append(i)

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            return cls(pq.read_table(path, columns=list(MANIFEST_COLUMNS)))
        except (OSError, pa.ArrowException) as err:
            raise EmbedError(f"{path}: cannot read the curated manifest ({err})") from None

    def shard_names(self) -> list[str]:
        return list(self._rows)

    def shard(self, name: str) -> ShardPlan:
        rows = np.asarray(self._rows.get(name, []), dtype=np.int64)
        keys = self.keys[rows].tolist()
        first = self.first[rows]
        return ShardPlan(
            image=dict(zip(keys, self.images[rows].tolist())),
            home=dict(zip(keys, self.shards[first].tolist())),
            encodes=frozenset(k for k, f, r in zip(keys, first.tolist(), rows.tolist()) if f == r),
        )


@dataclass(frozen=True)
class Detection:
    """A detect row: boxes by descending confidence, or the reason the image was rejected."""

    width: int | None
    height: int | None
    boxes: np.ndarray
    confidences: np.ndarray
    classes: np.ndarray
    class_names: list[str]
    reject: str | None


def read_detections(path: Path, shard: str) -> dict[str, Detection]:
    """The detect rows of one shard (its file name), by key. detect writes a row group per
    shard, so the filter reads only that shard's rows."""
    try:
        t = pq.read_table(path, columns=list(DETECT_COLUMNS), filters=[("shard", "==", shard)])
    except (OSError, pa.ArrowException) as err:
        raise EmbedError(f"{path}: not a readable regions table from detect ({err})") from None
    cols = {c: t.column(c) for c in DETECT_COLUMNS}
    boxes = cols["boxes"].combine_chunks()
    conf = cols["confidences"].combine_chunks()
    cls = cols["classes"].combine_chunks()
    flat_boxes = np.asarray(boxes.flatten().flatten().to_numpy(zero_copy_only=False), np.float32).reshape(
        -1, 4
    )
    flat_conf = np.asarray(conf.flatten().to_numpy(zero_copy_only=False), np.float32)
    flat_cls = np.asarray(cls.flatten().to_numpy(zero_copy_only=False), np.int32)
    counts = [pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in (boxes, conf, cls)]
    if not (np.array_equal(counts[0], counts[1]) and np.array_equal(counts[0], counts[2])):
        raise EmbedError(f"{path}: shard {shard}: boxes, confidences and classes differ in length")
    offsets = np.asarray(boxes.offsets.to_numpy()) - boxes.offsets[0].as_py()
    out = {}
    rows = zip(*(cols[c].to_pylist() for c in ("key", "width", "height", "class_names", "reject")))
    for i, (key, w, h, names, reject) in enumerate(rows):
        a, b = offsets[i], offsets[i + 1]
        order = np.argsort(-flat_conf[a:b], kind="stable")
        out[key] = Detection(
            w,
            h,
            flat_boxes[a:b][order],
            flat_conf[a:b][order],
            flat_cls[a:b][order],
            [names[j] for j in order],
            reject,
        )
    return out
