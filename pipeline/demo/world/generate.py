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

COCO, Flickr30k and CC are written here; the zero-shot sets by zeroshot.py, the probe by probes.py,
every image drawn by paint.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.config import World
from pipeline.demo.world import formats, probes, zeroshot
from pipeline.demo.world.paint import (
    CC,
    COCO,
    FLICKR,
    ID_STREAM,
    GroundTruth,
    Job,
    Painter,
    unique_ids,
)
from pipeline.demo.world.scene import COLOURS, SHAPES


def generate_world(cfg: World, out: Path | str, workers: int = 1, progress: bool = True) -> dict:
    """Write the whole demo world to `out` atomically; returns the summary also in world.json."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    truth = GroundTruth()
    with Painter(cfg, workers, progress) as painter:
        coco = _write_coco(cfg, tmp, painter, truth)
        flickr = _write_flickr(cfg, tmp, painter, truth, coco["test_keys"])
        cc = _write_cc(cfg, tmp, painter, truth, flickr["test_keys"])
        imagenet = zeroshot.write_imagenet(cfg, tmp, painter, truth)
        cifar = zeroshot.write_cifar(cfg, tmp, painter)
        probe = probes.write_probe(cfg, tmp, painter, truth)
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
    ids = unique_ids(cfg.seed, COCO, n, 1, 600_000)
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
    files2017: dict[str, list[dict]] = {"train2017": [], "val2017": []}
    anns2017: dict[str, list[dict]] = {"train2017": [], "val2017": []}
    karpathy, test_keys, ann_id = [], [], 1
    for i, sample in enumerate(painter.paint(jobs, "coco")):
        cocoid = ids[i]
        split2017 = "val2017" if i in in_val2017 else "train2017"
        split2014 = "train2014" if i < c.train2014 else "val2014"
        name = f"{cocoid:012d}.jpg"
        path = root / "coco" / split2017 / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.jpeg)
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
    ids = unique_ids(cfg.seed, FLICKR, n, 1_000_000_000, 9_999_999_999)
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
        (folder / name).write_bytes(sample.jpeg)
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
        rows: list[dict] = []
        status_dict: dict[str, int] = {}
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
                data = sample.jpeg
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
