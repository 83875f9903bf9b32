"""The demo world: every raw dataset the pipeline reads, generated in its real format.

Layout under the output folder:

    coco/annotations/captions_{train,val}2017.json   coco/{train,val}2017/000000xxxxxx.jpg
    karpathy/dataset_coco.json, dataset_flickr30k.json   (Karpathy's splits; COCO names 2014 files)
    karpathy/coco_test_karpathy.json, flickr30k_test_karpathy.txt   (the test sets as CLIP_benchmark
                                                                      ships them)
    flickr30k/flickr30k-images/<id>.jpg
    cc/<shard>.tar, <shard>.parquet, <shard>_stats.json  (img2dataset output)
    imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG, imagenet/LOC_synset_mapping.txt
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    cifar-100-python/{train,test,meta}
    sugarcrepe/<category>.json, sugarcrepe/images/*.jpg   (the compositional probe, SugarCrepe's format)
    ground_truth.parquet   one row per drawn object (file, class, box, visibility)
    world.json             counts, class lists and every planted overlap

Each image is drawn from its own seed — (world seed, source, index) — so the output does not
depend on the number of worker processes, and a planted duplicate is the very same drawing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.config import World
from pipeline.world import formats, probes
from pipeline.world.captions import captions, plural
from pipeline.world.scene import (
    COLOURS,
    SHAPES,
    WARM_COLOURS,
    Scene,
    render,
    sample_layout,
    single_object_layout,
)

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
CIFAR_SIZE = 32

COLOUR_SHAPE_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


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
    data: bytes | np.ndarray
    scene: Scene
    captions: tuple[str, ...]


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
    """Runs jobs in worker processes, yielding samples in job order."""

    def __init__(self, cfg: World, progress: bool = True):
        self._fn = functools.partial(
            make_sample, seed=cfg.seed, image_size=tuple(cfg.image_size), max_objects=cfg.max_objects
        )
        self._workers = cfg.workers
        self._progress = progress
        self._pool = None

    def __enter__(self) -> Painter:
        if self._workers > 1:
            # spawn, not fork: the caller may have started threads (torch, BLAS) before us.
            self._pool = multiprocessing.get_context("spawn").Pool(self._workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def paint(self, jobs: list[Job], desc: str) -> Iterator[Sample]:
        it: Iterable[Sample]
        if self._pool is None:
            it = map(self._fn, jobs)
        else:
            it = self._pool.imap(self._fn, jobs, chunksize=16)
        yield from tqdm(it, total=len(jobs), desc=desc, disable=not self._progress, leave=False)


def _unique_ids(seed: int, source: int, n: int, low: int, high: int) -> list[int]:
    rng = np.random.default_rng([seed, source, 0, ID_STREAM])
    return [int(v) for v in rng.choice(high - low, size=n, replace=False) + low]


class GroundTruth:
    """Collects one row per drawn object, for detector and probe evaluation."""

    def __init__(self):
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


def generate_world(cfg: World, out: Path | str, progress: bool = True) -> dict:
    """Write the whole demo world to `out` atomically; returns the summary also in world.json."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    truth = GroundTruth()
    with Painter(cfg, progress) as painter:
        coco = _write_coco(cfg, tmp, painter, truth)
        flickr = _write_flickr(cfg, tmp, painter, truth, coco["test_keys"])
        cc = _write_cc(cfg, tmp, painter, truth, flickr["test_keys"])
        imagenet = _write_imagenet(cfg, tmp, painter, truth)
        cifar = _write_cifar(cfg, tmp, painter)
        probe = _write_probe(cfg, tmp, painter, truth)
    truth.write(tmp / "ground_truth.parquet")
    summary = {
        "generator": "dclip demo world, version 1",
        "seed": cfg.seed,
        "coco": coco["summary"],
        "flickr30k": flickr["summary"],
        "cc": cc["summary"],
        "imagenet": imagenet,
        "cifar": cifar,
        "probe": probe,
        "planted_duplicates": flickr["planted"] + cc["planted"],
        "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": ["small", "large"]},
    }
    formats.write_json(tmp / "world.json", summary)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


# --- COCO + Karpathy's COCO splits -----------------------------------------------------------


def _write_coco(cfg: World, root: Path, painter: Painter, truth: GroundTruth) -> dict:
    c = cfg.coco
    n = c.train2014 + c.val2014
    ids = _unique_ids(cfg.seed, COCO, n, 1, 600_000)
    rng = np.random.default_rng([cfg.seed, COCO, 0, ID_STREAM + 1])
    val_idx = np.arange(c.train2014, n)
    karpathy_split = {int(i): "train" for i in range(c.train2014)}
    perm = rng.permutation(val_idx)
    for k, i in enumerate(perm):
        karpathy_split[int(i)] = (
            "test" if k < c.karpathy_test else "val" if k < c.karpathy_test + c.karpathy_val else "restval"
        )
    in_val2017 = {int(i) for i in rng.permutation(val_idx)[: c.val2017]}

    jobs = [Job(COCO, i, COCO, i, "coco", 5) for i in range(n)]
    files2017 = {"train2017": [], "val2017": []}
    anns2017 = {"train2017": [], "val2017": []}
    karpathy, test_keys, ann_id = [], [], 1
    for i, sample in enumerate(painter.paint(jobs, "coco")):
        cocoid = ids[i]
        split2017 = "val2017" if i in in_val2017 else "train2017"
        split2014 = "train2014" if i < c.train2014 else "val2014"
        name = f"{cocoid:012d}.jpg"
        path = root / "coco" / split2017 / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.data)
        truth.add(f"coco/{split2017}/{name}", sample.scene)
        files2017[split2017].append(
            {
                "license": int(rng.choice([1, 2, 4])),
                "file_name": name,
                "coco_url": f"https://dclip.invalid/coco/{split2017}/{name}",
                "height": sample.scene.height,
                "width": sample.scene.width,
                "date_captured": f"2013-{1 + cocoid % 12:02d}-{1 + cocoid % 28:02d} 12:00:00",
                "flickr_url": f"https://dclip.invalid/flickr/{cocoid}.jpg",
                "id": cocoid,
            }
        )
        for text in sample.captions:
            anns2017[split2017].append({"image_id": cocoid, "id": ann_id, "caption": text})
            ann_id += 1
        karpathy.append(
            {
                "split": karpathy_split[i],
                "filepath": split2014,
                "filename": f"COCO_{split2014}_{cocoid:012d}.jpg",
                "cocoid": cocoid,
                "captions": list(sample.captions),
            }
        )
        if karpathy_split[i] == "test":
            test_keys.append((i, f"coco/{split2017}/{name}"))
    for split, images in files2017.items():
        images.sort(key=lambda im: im["id"])
        formats.write_json(
            root / "coco" / "annotations" / f"captions_{split}.json",
            formats.coco_captions(images, anns2017[split], 2017),
        )
        (root / "coco" / split).mkdir(parents=True, exist_ok=True)
    # Karpathy lists the val2014 images first, as the real file does.
    karpathy.sort(key=lambda e: e["filepath"] != "val2014")
    formats.write_json(root / "karpathy" / "dataset_coco.json", formats.karpathy_images(karpathy, "coco"))
    sizes = {im["id"]: (im["width"], im["height"]) for images in files2017.values() for im in images}
    formats.write_json(
        root / "karpathy" / "coco_test_karpathy.json", formats.clip_benchmark_coco_test(karpathy, sizes)
    )
    splits = [e["split"] for e in karpathy]
    test_in_train2017 = sum(1 for i, _ in test_keys if i not in in_val2017)
    return {
        "test_keys": test_keys,
        "summary": {
            "images": n,
            "captions": ann_id - 1,
            "train2017": len(files2017["train2017"]),
            "val2017": len(files2017["val2017"]),
            "karpathy": {s: splits.count(s) for s in ("train", "restval", "val", "test")},
            "karpathy_test_in_train2017": test_in_train2017,
        },
    }


# --- Flickr30k -------------------------------------------------------------------------------


def _write_flickr(cfg: World, root: Path, painter: Painter, truth: GroundTruth, coco_test: list) -> dict:
    f = cfg.flickr30k
    n = f.train + f.val + f.test
    ids = _unique_ids(cfg.seed, FLICKR, n, 1_000_000_000, 9_999_999_999)
    split = ["train"] * f.train + ["val"] * f.val + ["test"] * f.test
    perm = np.random.default_rng([cfg.seed, FLICKR, 0, ID_STREAM + 1]).permutation(n)
    split = [split[int(k)] for k in perm]
    # Planted: the first train images are copies of COCO Karpathy test images.
    train_idx = [i for i in range(n) if split[i] == "train"]
    planted_from = dict(zip(train_idx, coco_test[: cfg.planted_duplicates]))
    jobs = []
    for i in range(n):
        src = planted_from.get(i)
        jobs.append(Job(COCO if src else FLICKR, src[0] if src else i, FLICKR, i, "flickr", 5))
    entries, planted, test_keys = [], [], []
    folder = root / "flickr30k" / "flickr30k-images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(painter.paint(jobs, "flickr30k")):
        name = f"{ids[i]}.jpg"
        (folder / name).write_bytes(sample.data)
        rel = f"flickr30k/flickr30k-images/{name}"
        truth.add(rel, sample.scene)
        entries.append({"split": split[i], "filename": name, "captions": list(sample.captions)})
        if i in planted_from:
            planted.append({"copy": rel, "of": planted_from[i][1], "copy_split": "train", "of_split": "test"})
        if split[i] == "test":
            test_keys.append((FLICKR, i, rel))
    formats.write_json(
        root / "karpathy" / "dataset_flickr30k.json", formats.karpathy_images(entries, "flickr30k")
    )
    formats.write_clip_benchmark_flickr_test(root / "karpathy" / "flickr30k_test_karpathy.txt", entries)
    return {
        "test_keys": test_keys,
        "planted": planted,
        "summary": {"images": n, "train": f.train, "val": f.val, "test": f.test},
    }


# --- Conceptual Captions as img2dataset shards -----------------------------------------------

DOWNLOAD_ERRORS = ("HTTP Error 404: Not Found", "<urlopen error timed out>", "HTTP Error 403: Forbidden")


def _write_cc(cfg: World, root: Path, painter: Painter, truth: GroundTruth, flickr_test: list) -> dict:
    c = cfg.cc
    rng = np.random.default_rng([cfg.seed, CC, 0, ID_STREAM + 1])
    order = rng.permutation(c.samples)
    failed = {int(i) for i in order[: c.failed]}
    corrupt = {int(i) for i in order[c.failed : c.failed + c.corrupt]}
    ok = [int(i) for i in order[c.failed + c.corrupt :]]
    planted_from = dict(zip(sorted(ok)[: cfg.planted_duplicates], flickr_test))
    jobs, job_rows = [], []
    for i in range(c.samples):
        if i in failed:
            continue
        src = planted_from.get(i)
        jobs.append(Job(src[0] if src else CC, src[1] if src else i, CC, i, "alt_text", 1))
        job_rows.append(i)
    samples = painter.paint(jobs, "cc")
    next_job = iter(zip(job_rows, samples))
    pending = next(next_job, None)
    planted, n_shards = [], (c.samples + c.shard_size - 1) // c.shard_size
    folder = root / "cc"
    folder.mkdir(parents=True, exist_ok=True)
    totals = {"success": 0, "failed_to_download": 0}
    for shard in range(n_shards):
        rows, status_dict = [], {}
        with formats.TarShard(folder / f"{shard:05d}.tar") as tar:
            for i in range(shard * c.shard_size, min((shard + 1) * c.shard_size, c.samples)):
                key = f"{shard:05d}{i - shard * c.shard_size:04d}"
                url = f"https://dclip.invalid/cc/{hashlib.sha1(f'{cfg.seed}-{i}'.encode()).hexdigest()[:16]}.jpg"
                if i in failed:
                    err = DOWNLOAD_ERRORS[i % len(DOWNLOAD_ERRORS)]
                    rows.append(
                        {
                            "url": url,
                            "caption": f"image {i} that could not be fetched",
                            "key": key,
                            "status": "failed_to_download",
                            "error_message": err,
                        }
                    )
                    status_dict[err] = status_dict.get(err, 0) + 1
                    totals["failed_to_download"] += 1
                    continue
                assert pending is not None and pending[0] == i
                sample = pending[1]
                pending = next(next_job, None)
                data = sample.data
                if i in corrupt:
                    data = data[: len(data) // 3]  # a transfer cut short: a truncated JPEG
                caption = sample.captions[0]
                meta = {
                    "url": url,
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": sample.scene.width,
                    "height": sample.scene.height,
                    "original_width": sample.scene.width,
                    "original_height": sample.scene.height,
                    "exif": None,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                tar.add(f"{key}.jpg", data)
                tar.add(f"{key}.txt", caption.encode())
                tar.add(f"{key}.json", json.dumps(meta).encode())
                rows.append(meta)
                status_dict["success"] = status_dict.get("success", 0) + 1
                totals["success"] += 1
                where = f"cc/{shard:05d}.tar:{key}"
                if i not in corrupt:
                    truth.add(where, sample.scene)
                if i in planted_from:
                    planted.append(
                        {"copy": where, "of": planted_from[i][2], "copy_split": "train", "of_split": "test"}
                    )
        formats.write_parquet(folder / f"{shard:05d}.parquet", rows, formats.IMG2DATASET_SCHEMA)
        successes = status_dict.get("success", 0)
        formats.write_json(
            folder / f"{shard:05d}_stats.json",
            {
                "count": len(rows),
                "successes": successes,
                "failed_to_download": len(rows) - successes,
                "failed_to_resize": 0,
                "duration": 0.0,
                "start_time": 0.0,
                "end_time": 0.0,
                "status_dict": dict(sorted(status_dict.items())),
            },
        )
    return {
        "planted": planted,
        "summary": {"samples": c.samples, "shards": n_shards, **totals, "corrupt": len(corrupt)},
    }


# --- zero-shot sets --------------------------------------------------------------------------


def imagenet_wnid(class_index: int) -> str:
    return f"n{90_000_000 + class_index}"


def _write_imagenet(cfg: World, root: Path, painter: Painter, truth: GroundTruth) -> dict:
    per = cfg.zeroshot.imagenet_per_class
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    # Drawn like the pretraining data (as ImageNet is to web data): zero-shot retention then
    # measures what fine-tuning on the curated domain forgets.
    jobs = [
        Job(IMAGENET, k * per + j, single=cls, domain="web")
        for k, cls in enumerate(classes)
        for j in range(per)
    ]
    # Real validation files are numbered in an order unrelated to their class.
    numbers = np.random.default_rng([cfg.seed, IMAGENET, 0, ID_STREAM]).permutation(len(jobs)) + 1
    base = root / "imagenet"
    for k in range(len(COLOUR_SHAPE_CLASSES)):
        (base / "val" / imagenet_wnid(k)).mkdir(parents=True, exist_ok=True)
    for j, sample in enumerate(painter.paint(jobs, "imagenet")):
        rel = f"imagenet/val/{imagenet_wnid(j // per)}/ILSVRC2012_val_{int(numbers[j]):08d}.JPEG"
        (root / rel).write_bytes(sample.data)
        truth.add(rel, sample.scene)
    (base / "LOC_synset_mapping.txt").write_text(
        "".join(f"{imagenet_wnid(k)} {name}\n" for k, name in enumerate(COLOUR_SHAPE_CLASSES))
    )
    return {"classes": len(classes), "images": len(jobs)}


def _cifar_images(
    painter: Painter, source: int, classes: list[tuple[str, str]], desc: str
) -> list[np.ndarray]:
    """One 32×32 image per (colour, shape)."""
    jobs = [
        Job(source, i, single=cls, size=(CIFAR_SIZE, CIFAR_SIZE), raw=True, domain="web")
        for i, cls in enumerate(classes)
    ]
    return [s.data for s in painter.paint(jobs, desc)]


def _balanced_labels(seed: int, source: int, n_classes: int, per_class: int) -> list[int]:
    labels = np.repeat(np.arange(n_classes), per_class)
    return [int(v) for v in np.random.default_rng([seed, source, 0, ID_STREAM]).permutation(labels)]


def _write_cifar(cfg: World, root: Path, painter: Painter) -> dict:
    z = cfg.zeroshot
    colours = list(COLOURS)
    # CIFAR-10: the ten shapes, each image in a colour of its own.
    c10 = root / "cifar-10-batches-py"

    def any_colour(source: int, labels: list[int]) -> list[tuple[str, str]]:
        picks = np.random.default_rng([cfg.seed, source, 0, ID_STREAM + 1]).integers(
            len(colours), size=len(labels)
        )
        return [(colours[int(p)], SHAPES[lab]) for p, lab in zip(picks, labels)]

    names10 = list(SHAPES)
    train_labels = _balanced_labels(cfg.seed, CIFAR10_TRAIN, 10, z.cifar10_train_per_class)
    test_labels = _balanced_labels(cfg.seed, CIFAR10_TEST, 10, z.cifar10_test_per_class)
    train = _cifar_images(painter, CIFAR10_TRAIN, any_colour(CIFAR10_TRAIN, train_labels), "cifar10 train")
    test = _cifar_images(painter, CIFAR10_TEST, any_colour(CIFAR10_TEST, test_labels), "cifar10 test")
    batches = np.array_split(np.arange(len(train)), 5)
    for b, idx in enumerate(batches, start=1):
        formats.write_py2_pickle(
            c10 / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [train_labels[i] for i in idx],
                "data": formats.cifar_rows([train[i] for i in idx]),
                "filenames": [f"{names10[train_labels[i]]}_s_{i:06d}.png" for i in idx],
            },
        )
    formats.write_py2_pickle(
        c10 / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels,
            "data": formats.cifar_rows(test),
            "filenames": [f"{names10[lab]}_s_{i:06d}.png" for i, lab in enumerate(test_labels)],
        },
    )
    formats.write_py2_pickle(
        c10 / "batches.meta",
        {"num_cases_per_batch": len(batches[0]), "label_names": names10, "num_vis": 3072},
    )

    # CIFAR-100: fine classes are colour_shape (alphabetical, as CIFAR-100's are); coarse classes
    # group each shape's warm and cool colours.
    fine = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
    coarse = sorted(
        {f"{'warm' if c in WARM_COLOURS else 'cool'}_{plural(s)}" for c in COLOURS for s in SHAPES}
    )

    def coarse_of(label: int) -> int:
        c, s = fine[label].split("_")
        return coarse.index(f"{'warm' if c in WARM_COLOURS else 'cool'}_{plural(s)}")

    c100 = root / "cifar-100-python"
    for name, source, per in (
        ("train", CIFAR100_TRAIN, z.cifar100_train_per_class),
        ("test", CIFAR100_TEST, z.cifar100_test_per_class),
    ):
        labels = _balanced_labels(cfg.seed, source, 100, per)
        images = _cifar_images(
            painter, source, [tuple(fine[lab].split("_")) for lab in labels], f"cifar100 {name}"
        )
        formats.write_py2_pickle(
            c100 / name,
            {
                "filenames": [f"{fine[lab]}_s_{i:06d}.png" for i, lab in enumerate(labels)],
                "batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [coarse_of(lab) for lab in labels],
                "data": formats.cifar_rows(images),
            },
        )
    formats.write_py2_pickle(c100 / "meta", {"fine_label_names": fine, "coarse_label_names": coarse})
    return {
        "cifar10": {"classes": 10, "train": len(train), "test": len(test)},
        "cifar100": {
            "classes": 100,
            "coarse_classes": len(coarse),
            "train": 100 * z.cifar100_train_per_class,
            "test": 100 * z.cifar100_test_per_class,
        },
    }


# --- the demo models' pretraining split ------------------------------------------------------


# --- the compositional probe (SugarCrepe's format) ---------------------------------------------


def _write_probe(cfg: World, root: Path, painter: Painter, truth: GroundTruth) -> dict:
    """sugarcrepe/<category>.json and sugarcrepe/images/*.jpg: fresh two- and three-object scenes,
    each giving at most one item per category; the first `per_category` items of each are kept."""
    p = cfg.probe
    ids = _unique_ids(cfg.seed, PROBE, p.images, 700_000, 799_999)  # apart from the COCO ids
    jobs = [Job(PROBE, i, n_objects=2 + i % 2) for i in range(p.images)]
    folder = root / "sugarcrepe" / "images"
    folder.mkdir(parents=True)
    items: dict[str, list[dict]] = {c: [] for c in probes.CATEGORIES}
    for i, sample in enumerate(painter.paint(jobs, "probe")):
        name = f"{ids[i]:012d}.jpg"
        rng = np.random.default_rng([cfg.seed, PROBE, i, CAPTION_STREAM])
        made = {c: probes.probe_pair(sample.scene, c, rng) for c in probes.CATEGORIES}
        wanted = {c: pair for c, pair in made.items() if pair is not None and len(items[c]) < p.per_category}
        if not wanted:
            continue
        (folder / name).write_bytes(sample.data)
        truth.add(f"sugarcrepe/images/{name}", sample.scene)
        for c, (caption, negative) in wanted.items():
            items[c].append({"filename": name, "caption": caption, "negative_caption": negative})
    short = {c: len(v) for c, v in items.items() if len(v) < p.per_category}
    if short:
        raise ValueError(
            f"world.probe.images: {p.images} images gave too few items for {short} "
            f"(per_category {p.per_category}); raise world.probe.images"
        )
    for c, rows in items.items():
        formats.write_json(root / "sugarcrepe" / f"{c}.json", {str(k): row for k, row in enumerate(rows)})
    return {"images": len(list(folder.iterdir())), "items": {c: len(v) for c, v in items.items()}}


def generate_pretrain_split(
    cfg: World,
    out: Path | str,
    n_train: int,
    n_val: int,
    single_object_fraction: float = 0.0,
    progress: bool = True,
    domain: str = "web",
) -> dict:
    """Captioned images with YOLO labels, from a seed stream no pipeline split uses.

    `domain` "web" (the demo CLIP's pretraining data: web-domain images with alt-text captions,
    source WEB) or "curated" (the detector's: curated-domain scenes with COCO-style captions,
    source PRETRAIN). The last `single_object_fraction` of the training images hold one object
    each.

    Layout (ultralytics' own): images/{train,val}/*.jpg, labels/{train,val}/*.txt, data.yaml with
    one class per shape; captions.jsonl has the five captions of every image.
    """
    if not 0.0 <= single_object_fraction <= 1.0:
        raise ValueError(f"single_object_fraction must be in [0, 1], got {single_object_fraction}")
    summary = pretrain_summary(cfg, n_train, n_val, single_object_fraction, domain)
    first_single = n_train - summary["single_object_train"]
    source, style = (WEB, "web") if domain == "web" else (PRETRAIN, "coco")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    lines = []
    with Painter(cfg, progress) as painter:
        for split, start, n in (("train", 0, n_train), ("val", n_train, n_val)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            jobs = [
                Job(
                    source,
                    start + i,
                    source,
                    start + i,
                    style,
                    5,
                    n_objects=1 if start + i >= first_single and split == "train" else None,
                    domain=domain,
                )
                for i in range(n)
            ]
            for i, sample in enumerate(painter.paint(jobs, f"pretrain {split}")):
                stem = f"{start + i:07d}"
                (tmp / "images" / split / f"{stem}.jpg").write_bytes(sample.data)
                objs = sample.scene.objects
                (tmp / "labels" / split / f"{stem}.txt").write_text(
                    formats.yolo_label(
                        [o.box for o in objs],
                        [SHAPES.index(o.shape) for o in objs],
                        sample.scene.width,
                        sample.scene.height,
                    )
                )
                lines.append(
                    json.dumps(
                        {
                            "image": f"images/{split}/{stem}.jpg",
                            "split": split,
                            "captions": list(sample.captions),
                        }
                    )
                )
    (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {k}: {s}\n" for k, s in enumerate(SHAPES))
    # No `path:` key: ultralytics then takes the folder of data.yaml as the dataset root.
    (tmp / "split.json").write_text(json.dumps(summary))
    (tmp / "data.yaml").write_text(f"train: images/train\nval: images/val\nnames:\n{names}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def pretrain_summary(
    cfg: World, n_train: int, n_val: int, single_object_fraction: float, domain: str = "web"
) -> dict:
    """What identifies a pretraining split (written to its split.json): its settings and the
    generator's code, so that a changed world is never mistaken for a cached split."""
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + path.read_bytes())
    return {
        "generator": code.hexdigest()[:16],
        "world_seed": cfg.seed,
        "image_size": list(cfg.image_size),
        "max_objects": cfg.max_objects,
        "domain": domain,
        "train": n_train,
        "val": n_val,
        "single_object_train": int(round(single_object_fraction * n_train)),
        "classes": list(SHAPES),
    }
