"""detect: YOLO regions for every training image.

`detect_shard` is a pure batch function, one WebDataset shard in, one table part out, and
`detect` runs it over every shard on a backend (pipeline.backend: here, or Ray workers) with resume:
each part is written atomically under scratch/<run key>/, named by its shard's content hash,
where the run key hashes everything else the output depends on (weights, settings, device,
library versions, this code). A run killed after k shards redoes only the others; the parts are
then streamed into the output table, which is renamed into place only when complete.

One row per shard sample, in shard order: boxes in pixels and normalised xyxy of the image as
stored in the shard, confidences, class ids and names, by descending confidence. An image with
no detection has empty lists; an image that fails to decode is a reject (reason and detail, empty
lists, no size) and the shard goes on.

Throughput: threads decode and letterbox ahead of the model (PIL's and OpenCV's C code release
the GIL, and so does the forward), the model sees whole batches, and a batch's post-processing
(ultralytics' NMS, then array arithmetic over its boxes) runs in a thread beside the next forward.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import images, parallel, parts
from pipeline.backend import LOCAL, Backend
from pipeline.files import file_digest
from pipeline.images import Reject
from pipeline.models.detector import Detections, Detector
from pipeline.shards import read_shard
from pipeline.tables import concat_parquet, write_table

_BOX = pa.list_(pa.list_(pa.float32(), 4))

REGIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()),  # of the image in the shard; null for a reject
        pa.field("height", pa.int32()),
        pa.field("regions", pa.int32(), nullable=False),
        pa.field("boxes", _BOX, nullable=False),  # xyxy pixels
        pa.field("boxes_norm", _BOX, nullable=False),  # xyxy ÷ (width, height, width, height)
        pa.field("confidences", pa.list_(pa.float32()), nullable=False),
        pa.field("classes", pa.list_(pa.int32()), nullable=False),
        pa.field("class_names", pa.list_(pa.string()), nullable=False),
        pa.field("reject", pa.string()),  # null, or why the image could not be read
        pa.field("reject_detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class Settings:
    """What, besides the detector and the images, decides the rows (the `detect` params)."""

    conf: float
    iou: float
    classes: tuple[int, ...] | None  # class ids kept; None: all
    max_regions: int  # per image, the most confident after the area filter
    min_area_fraction: float  # of the image's area
    batch_size: int  # images per forward (float results may differ in the last bits)


# --- one shard ---------------------------------------------------------------------------------


def prepare(sample: dict[str, bytes], letterbox: Callable[[np.ndarray], np.ndarray]):
    """Worker: a shard sample → (letterboxed image, height, width), or the Reject."""
    image = images.decode_sample(sample)
    if isinstance(image, Reject):
        return image
    rgb = np.asarray(image)
    return letterbox(rgb), rgb.shape[0], rgb.shape[1]


def select(dets: Detections, shapes: np.ndarray, min_area_fraction: float, max_regions: int) -> Detections:
    """Drop boxes under min_area_fraction of their image, then keep each image's max_regions most
    confident (the rows come sorted by confidence within an image). Array arithmetic only."""
    n = len(dets.counts)
    owner = np.repeat(np.arange(n), dets.counts)
    b = dets.boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / shapes[owner].prod(axis=1)
    kept = np.flatnonzero(area >= min_area_fraction)
    counts = np.bincount(owner[kept], minlength=n)
    rank = np.arange(len(kept)) - np.repeat(np.cumsum(counts) - counts, counts)
    kept = kept[rank < max_regions]
    return Detections(
        boxes=dets.boxes[kept],
        confidences=dets.confidences[kept],
        classes=dets.classes[kept],
        counts=np.bincount(owner[kept], minlength=n),
    )


class _Part:
    """A shard's rows, column-wise; detections are added a batch at a time."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sizes: list[tuple[int, int] | None] = []  # (height, width)
        self.rejects: list[Reject | None] = []
        self.counts: list[int] = []
        self.dets: list[Detections] = []

    def add(self, key: str, result: Any) -> None:
        self.keys.append(key)
        bad = isinstance(result, Reject)
        self.sizes.append(None if bad else (result[1], result[2]))
        self.rejects.append(result if bad else None)
        self.counts.append(0)

    def table(self, shard: str, names: dict[int, str]) -> pa.Table:
        if self.dets:
            boxes = np.concatenate([d.boxes for d in self.dets])
            conf = np.concatenate([d.confidences for d in self.dets])
            cls = np.concatenate([d.classes for d in self.dets])
        else:
            boxes, conf, cls = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
        counts = np.asarray(self.counts, dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        hw = np.array([s if s else (0, 0) for s in self.sizes], dtype=np.int64).reshape(-1, 2)
        owner = np.repeat(np.arange(len(counts)), counts)
        norm = boxes / np.stack([hw[owner, 1], hw[owner, 0]] * 2, axis=1)
        lookup = pa.array([names.get(i, str(i)) for i in range(max(names, default=-1) + 1)], pa.string())
        missing = np.array([s is None for s in self.sizes], dtype=bool)

        def nested(flat: np.ndarray, width: int | None = None) -> pa.Array:
            values = pa.array(flat.ravel())
            if width:
                values = pa.FixedSizeListArray.from_arrays(values, width)
            return pa.ListArray.from_arrays(offsets, values)

        columns = {
            "key": pa.array(self.keys, pa.string()),
            "shard": pa.array([shard] * len(self.keys), pa.string()),
            "width": pa.array(hw[:, 1], pa.int32(), mask=missing),
            "height": pa.array(hw[:, 0], pa.int32(), mask=missing),
            "regions": pa.array(counts, pa.int32()),
            "boxes": nested(boxes.astype(np.float32), 4),
            "boxes_norm": nested(norm.astype(np.float32), 4),
            "confidences": nested(conf),
            "classes": nested(cls.astype(np.int32)),
            "class_names": pa.ListArray.from_arrays(offsets, pc.take(lookup, pa.array(cls, pa.int32()))),
            "reject": pa.array([r.reason if r else None for r in self.rejects], pa.string()),
            "reject_detail": pa.array([r.detail if r else None for r in self.rejects], pa.string()),
        }
        return pa.Table.from_arrays(list(columns.values()), names=list(columns)).cast(REGIONS_SCHEMA)


def detect_shard(
    path: Path | str,
    detector: Detector,
    settings: Settings,
    pool: Executor,
    on_batch: Callable[[int], None] | None = None,
) -> pa.Table:
    """The regions of one shard's images (REGIONS_SCHEMA), decoded and letterboxed by `pool`."""
    path = Path(path)
    part = _Part()
    batch: list[np.ndarray] = []
    rows: list[int] = []
    # Post-processing of batch k runs in the pool while the model runs batch k + 1.
    posting: deque = deque()
    classes = list(settings.classes) if settings.classes is not None else None

    def post(preds, shapes: np.ndarray) -> Detections:
        dets = detector.postprocess(
            preds, shapes, settings.conf, settings.iou, classes, max_det=max(300, settings.max_regions)
        )
        return select(dets, shapes, settings.min_area_fraction, settings.max_regions)

    def collect(limit: int) -> None:
        while len(posting) > limit:
            batch_rows, future = posting.popleft()
            dets = future.result()
            part.dets.append(dets)
            for i, c in zip(batch_rows, dets.counts.tolist()):
                part.counts[i] = c
            if on_batch:
                on_batch(len(batch_rows))

    def flush() -> None:
        shapes = np.array([part.sizes[i] for i in rows], dtype=np.int64)
        posting.append((list(rows), pool.submit(post, detector.forward(np.stack(batch)), shapes)))
        collect(1)
        batch.clear()
        rows.clear()

    def work(item: tuple[str, dict[str, bytes]]):
        return item[0], prepare(item[1], detector.letterbox)

    window = 2 * settings.batch_size
    for key, result in parallel.ordered_map(work, read_shard(path), pool, window):
        part.add(key, result)
        if not isinstance(result, Reject):
            batch.append(result[0])
            rows.append(len(part.keys) - 1)
            if len(batch) == settings.batch_size:
                flush()
    if batch:
        flush()
    collect(0)
    return part.table(path.name, detector.names)


# --- every shard, resumable ------------------------------------------------------------------------


def run_key(detector: Detector, settings: Settings) -> str:
    """Hash of everything but the shards that the rows depend on."""
    import torch
    import ultralytics

    spec = {
        "weights": detector.digest,
        "imgsz": detector.imgsz,
        "device": detector.device.type,
        "half": detector.half,
        "settings": asdict(settings),
        "versions": [ultralytics.__version__, torch.__version__, pa.__version__],
    }
    return parts.run_key(spec, [sys.modules[__name__], Detector.__module__, images])


class Worker(parts.PartMaker):
    """A detect worker (pipeline.backend): its model, loaded once, and its decode threads."""

    def __init__(self, model: Detector | Callable[[], Detector], settings: Settings, threads: parallel.Count):
        self.detector = model if isinstance(model, Detector) else model()
        self.settings = settings
        self._stack = ExitStack()
        self.pool = self._stack.enter_context(parallel.pool(threads, "threads", name="decode"))

    def key(self) -> str:
        return run_key(self.detector, self.settings)

    def make(self, tmp: Path, shard: str, *, progress: Callable[[int], None]) -> None:
        table = detect_shard(shard, self.detector, self.settings, self.pool, progress)
        write_table(tmp, table, REGIONS_SCHEMA)

    def close(self) -> None:
        self._stack.close()


def detect(
    shards: list[Path],
    out: Path,
    scratch: Path,
    detector: Detector | Callable[[], Detector],
    settings: Settings,
    workers: parallel.Count = 2,
    progress: bool = True,
    backend: Backend = LOCAL,
) -> dict:
    """Regions of every shard into `out` (REGIONS_SCHEMA), resuming from the parts in `scratch`;
    returns the counts for the metrics file. Parts of other runs are removed once `out` is whole.
    `detector` is the model, or on the Ray backend a picklable function that loads it."""
    if backend.kind != "local" and isinstance(detector, Detector):
        raise TypeError("the Ray backend loads the model on its workers: pass a function that loads it")
    bar = tqdm(desc="detect", unit="img", disable=not progress)
    with backend.start(partial(Worker, detector, settings, workers)) as pool:
        store = parts.Parts(scratch, pool.ask("key"))
        jobs = [parts.Job(f"{s.stem}-{file_digest(s)[:16]}.parquet", (str(s),)) for s in shards]
        for _ in store.compute(jobs, pool, bar.update):
            bar.set_postfix(shards=f"{len(store.used)}/{len(shards)}", reused=store.reused)
    bar.close()
    concat_parquet(out, store.used, REGIONS_SCHEMA)
    store.prune()
    return summarise(store.used)


def summarise(part_files: list[Path]) -> dict:
    """Counts over the parts: a function of the rows alone, so the metrics file is too."""
    images_ = empty = regions = 0
    rejects: Counter = Counter()
    for part in part_files:
        t = pq.read_table(part, columns=["regions", "reject"])
        counts = t.column("regions").to_numpy()
        reject = t.column("reject").to_pylist()
        images_ += len(counts)
        regions += int(counts.sum())
        empty += sum(1 for c, r in zip(counts.tolist(), reject) if c == 0 and r is None)
        rejects.update(r for r in reject if r is not None)
    return {
        "shards": len(part_files),
        "images": images_,
        "images_without_detections": empty,
        "regions": regions,
        "rejects": sum(rejects.values()),
        "rejects_by_reason": dict(sorted(rejects.items())),
    }
