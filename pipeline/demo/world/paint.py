"""Drawing the demo world's images: a job names one drawing, `make_sample` renders it, and a
`Painter` renders many in worker processes, in order.

Each image is drawn from its own seed — (world seed, source, index) — so the output does not
depend on the number of worker processes, and a planted duplicate is the very same drawing.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import parallel
from pipeline.config import World
from pipeline.demo.world import formats
from pipeline.demo.world.captions import captions
from pipeline.demo.world.scene import Scene, render, sample_layout, single_object_layout

# Source codes: the second element of every image's seed. Never reuse one: a new source or split
# gets a new code, so that no two images share a seed by accident.
COCO, FLICKR, CC, IMAGENET, CIFAR10_TRAIN, CIFAR10_TEST, CIFAR100_TRAIN, CIFAR100_TEST, PRETRAIN, PROBE = (
    range(1, 11)
)
WEB = 11  # the demo CLIP's web-domain pretraining split (PRETRAIN: the detector's, curated domain)
SCENE_STREAM, CAPTION_STREAM, ID_STREAM = 0, 1, 2

JPEG_QUALITY = 90
OBJECT_COUNT_WEIGHTS = (0.25, 0.35, 0.25, 0.15)  # 1, 2, 3, 4 objects
WEB_OBJECT_COUNT_WEIGHTS = (0.55, 0.3, 0.1, 0.05)  # object-centric: mostly one or two
CLASS_FILL = (0.4, 0.7)  # single-object class images: object side ÷ short side


@dataclass(frozen=True)
class Job:
    source: int
    index: int  # with the world seed and `source`: the drawing
    caption_source: int = 0  # the caption stream's (source, index); differs for planted copies
    caption_index: int = 0
    style: str | None = None
    n_captions: int = 0
    single: tuple[str, str] | None = None  # (colour, shape) of a one-object class image
    n_objects: int | None = None  # a scene of exactly this many random objects
    size: tuple[int, int] | None = None  # fixed (width, height); otherwise drawn at random
    raw: bool = False  # return the pixels (CIFAR) instead of JPEG bytes
    domain: str = "curated"  # or "web": the layouts and backgrounds of scene.py's two domains


@dataclass(frozen=True)
class Sample:
    data: bytes | np.ndarray  # JPEG bytes, or the pixels of a `raw` job
    scene: Scene
    captions: tuple[str, ...]

    @property
    def jpeg(self) -> bytes:
        if not isinstance(self.data, bytes):
            raise TypeError("a raw job's sample holds pixels, not a JPEG")
        return self.data

    @property
    def pixels(self) -> np.ndarray:
        if not isinstance(self.data, np.ndarray):
            raise TypeError("a JPEG sample holds bytes; draw the job with raw=True for pixels")
        return self.data


def make_sample(job: Job, seed: int, image_size: tuple[int, int], max_objects: int) -> Sample:
    rng = np.random.default_rng([seed, job.source, job.index, SCENE_STREAM])
    if job.size is not None:
        width, height = job.size
    else:
        width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    if job.single is not None:
        colour, shape = job.single
        layout = single_object_layout(rng, width, height, shape, colour, CLASS_FILL, job.domain)
    else:
        if job.n_objects is not None:
            n = job.n_objects
        else:
            counts = WEB_OBJECT_COUNT_WEIGHTS if job.domain == "web" else OBJECT_COUNT_WEIGHTS
            weights = np.array(counts[:max_objects])
            n = 1 + int(rng.choice(max_objects, p=weights / weights.sum()))
        layout = sample_layout(rng, width, height, n, job.domain)
    image, scene = render(layout, rng)
    texts: tuple[str, ...] = ()
    if job.style is not None:
        crng = np.random.default_rng([seed, job.caption_source, job.caption_index, CAPTION_STREAM])
        texts = tuple(captions(scene, crng, job.n_captions, job.style))
    if job.raw:
        return Sample(np.asarray(image, dtype=np.uint8), scene, texts)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Sample(buf.getvalue(), scene, texts)


class Painter:
    """Paints jobs in worker processes (pipeline.parallel's one ordered pool), yielding samples in
    job order; with one worker, in this process."""

    CHUNK = 16  # jobs sent to a worker at a time
    WINDOW_PER_WORKER = 4  # chunks in flight per worker

    def __init__(self, cfg: World, workers: int = 1, progress: bool = True):
        self._fn = functools.partial(
            make_sample,
            seed=cfg.seed,
            image_size=(cfg.image_size[0], cfg.image_size[1]),
            max_objects=cfg.max_objects,
        )
        self._workers = workers
        self._progress = progress
        self._stack = ExitStack()
        self._executor: Executor | None = None

    def __enter__(self) -> Painter:
        self._executor = self._stack.enter_context(parallel.pool(self._workers, "processes"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor = None
        self._stack.close()

    def paint(self, jobs: list[Job], desc: str) -> Iterator[Sample]:
        window = self.WINDOW_PER_WORKER * max(1, self._workers)
        it = parallel.ordered_map(self._fn, jobs, self._executor, window, self.CHUNK)
        yield from tqdm(it, total=len(jobs), desc=desc, disable=not self._progress, leave=False)


def unique_ids(seed: int, source: int, n: int, low: int, high: int) -> list[int]:
    rng = np.random.default_rng([seed, source, 0, ID_STREAM])
    return [int(v) for v in rng.choice(high - low, size=n, replace=False) + low]


class GroundTruth:
    """Collects one row per drawn object, for detector and probe evaluation."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, file: str, scene: Scene) -> None:
        for obj, vis in zip(scene.objects, scene.visible):
            x0, y0, x1, y1 = obj.box
            self.rows.append(
                {
                    "file": file,
                    "width": scene.width,
                    "height": scene.height,
                    "shape": obj.shape,
                    "colour": obj.colour,
                    "size": obj.size,
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "visible": vis,
                }
            )

    def write(self, path: Path) -> None:
        schema = pa.schema(
            [
                ("file", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("shape", pa.string()),
                ("colour", pa.string()),
                ("size", pa.string()),
                ("x0", pa.int32()),
                ("y0", pa.int32()),
                ("x1", pa.int32()),
                ("y1", pa.int32()),
                ("visible", pa.float32()),
            ]
        )
        formats.write_parquet(path, self.rows, schema)
