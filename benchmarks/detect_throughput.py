"""Throughput of the detect stage against the fused forward pass of the same model on the same
images, measured in one run; the same for YOLOv8x (random weights) at 640; and the stage's peak
memory at 1× and 4× the demo's training shards.

    python benchmarks/detect_throughput.py [--params params.yaml] [--shards 1] [--repeats 4]

- stage: `pipeline.detect.detect` over whole shards (read, decode, letterbox in threads, batched
  forward, NMS, area filter, part and table writes), from an empty scratch folder each time.
- forward: `Detector.forward` alone on the same images, letterboxed beforehand and held in memory.
- predict: `YOLO.predict()` on the decoded images, batched, for reference.
The two run back to back, --repeats pairs: the best of each, and the median of the pairs' ratios
(other load on the machine touches both runs of a pair alike).
Peak RSS: the stage in a fresh subprocess (its VmHWM), on the demo's shards and on 4
copies of each under other names (computed anew: a part is named by its shard).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import images
from pipeline.config import load_params
from pipeline.detect import Settings, detect, prepare
from pipeline.models import detector as yolo
from pipeline.shards import ShardWriter, read_shard


def settings_from(params) -> Settings:
    d = params.detect
    return Settings(d.conf, d.iou, None, d.max_regions, d.min_area_fraction, params.runtime.batch_size.detect)


def letterboxed(shards: list[Path], model: yolo.Detector, limit: int | None = None) -> np.ndarray:
    out = []
    for shard in shards:
        for _key, sample in read_shard(shard):
            result = prepare(sample, model.letterbox)
            if isinstance(result, tuple):
                out.append(result[0])
            if limit and len(out) == limit:
                return np.stack(out)
    return np.stack(out)


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU time is this process's, every thread's."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_run(model: yolo.Detector, batch: np.ndarray, batch_size: int) -> tuple[float, float]:
    model.forward(batch[:batch_size])  # warm-up
    return timed(lambda: [model.forward(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])


def stage_run(
    model: yolo.Detector, shards: list[Path], settings: Settings, workers: int
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="detect-bench-") as tmp:
        out, scratch = Path(tmp) / "regions.parquet", Path(tmp) / "scratch"
        return timed(lambda: detect(shards, out, scratch, model, settings, workers, False))


def predict_ips(weights: str, shards: list[Path], imgsz: int, settings: Settings, n: int) -> float:
    from ultralytics import YOLO

    pil = [images.decode(s["jpg"]) for shard in shards for _k, s in read_shard(shard)][:n]
    model = YOLO(weights)
    # Any: a dict of mixed values would be typed dict[str, object], which predict's typed
    # keywords do not accept.
    kwargs: dict[str, Any] = dict(
        imgsz=imgsz, conf=settings.conf, iou=settings.iou, device="cpu", verbose=False
    )
    model.predict(pil[: settings.batch_size], batch=settings.batch_size, **kwargs)
    start = time.perf_counter()
    for i in range(0, len(pil), settings.batch_size):
        model.predict(pil[i : i + settings.batch_size], batch=settings.batch_size, **kwargs)
    return len(pil) / (time.perf_counter() - start)


def compare(label, model, shards, settings, workers, repeats, n, extra=None) -> dict:
    """Forward-only and stage runs back to back, `repeats` pairs: the best of each, the median of
    the pairs' ratios (each pair saw about the same load from anything else on the machine), and
    the ratio of CPU seconds per image, which other load does not move."""
    batch = letterboxed(shards, model, n)
    fwd, stage = [], []
    for _ in range(repeats):
        fwd.append(forward_run(model, batch, settings.batch_size))
        stage.append(stage_run(model, shards, settings, workers))
    (fw, fc), (sw, sc) = (np.min(np.array(runs), axis=0) for runs in (fwd, stage))
    row = {"model": label, "imgsz": model.imgsz, "images": len(batch), "batch": settings.batch_size}
    return row | {
        "forward_img_s": round(len(batch) / fw, 2),
        "stage_img_s": round(len(batch) / sw, 2),
        "stage/forward": round(fw / sw, 3),
        "stage/forward_median_pair": round(float(np.median([f[0] / s[0] for f, s in zip(fwd, stage)])), 3),
        "stage/forward_cpu": round(fc / sc, 3),
        **(extra or {}),
    }


def peak_rss(params_file: Path, shards: list[Path], copies: int, threads: int | None) -> dict:
    """The stage's peak RSS on `copies` × the shards, in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="detect-rss-") as tmp:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        for c in range(copies):
            for s in shards:
                (folder / f"{c:02d}-{s.name}").symlink_to(s.resolve())
        child = [sys.executable, __file__, "--params", str(params_file), "--rss-child", str(folder), tmp]
        child += ["--threads", str(threads)] if threads else []
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork and exec, so a child started by a large parent would report the parent's size."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB


def rss_child(params_file: Path, folder: Path, tmp: Path) -> None:
    params = load_params(params_file)
    d = params.detect
    model = yolo.load(params.detector.model, params.detector.weights, d.imgsz, "cpu", params_file.parent)
    shards = sorted(folder.glob("*.tar"))
    start = time.perf_counter()
    workers = params.runtime.workers
    metrics = detect(shards, tmp / "r.parquet", tmp / "scratch", model, settings_from(params), workers, False)
    seconds = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    row = {"shards": len(shards), "images": metrics["images"], "seconds": round(seconds, 1)}
    print(json.dumps(row | {"peak_rss_mb": round(rss_mb)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--shards", type=int, default=1, help="training shards for the throughput runs")
    parser.add_argument("--repeats", type=int, default=4, help="pairs of runs (best of each)")
    parser.add_argument("--v8x-images", type=int, default=8, help="images for YOLOv8x at 640; 0 skips")
    parser.add_argument("--rss", type=int, nargs="*", default=[1, 4], help="multiples of the demo shards")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rss-child", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args.params, *args.rss_child)
    # Other work on the machine moves every figure: say how much there was.
    print(json.dumps({"torch_threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]}))

    params = load_params(args.params)
    root = args.params.parent
    d, workers = params.detect, params.runtime.workers
    train = sorted((root / params.curate.out / "train").glob("*.tar"))
    if not train:
        raise SystemExit(
            f"no shards under {root / params.curate.out / 'train'}: run `dvc repro curate` first"
        )
    shards = train[: args.shards]
    settings = settings_from(params)
    model = yolo.load(params.detector.model, params.detector.weights, d.imgsz, "cpu", root)
    n = sum(1 for s in shards for _ in read_shard(s))
    ref = {
        "predict_img_s": round(
            predict_ips(str(root / params.detector.weights), shards, d.imgsz, settings, n), 1
        )
    }
    row = compare(params.detector.weights, model, shards, settings, workers, args.repeats, n, ref)
    print(json.dumps(row), flush=True)

    if args.v8x_images:
        big = yolo.load("yolov8x.yaml", "none", 640, "cpu")
        few = Settings(d.conf, d.iou, None, d.max_regions, d.min_area_fraction, 8)
        with tempfile.TemporaryDirectory() as tmp:
            # Whole shards are the stage's unit: cut one of the wanted size.
            with ShardWriter(tmp, max_count=args.v8x_images) as w:
                for _, (key, sample) in zip(range(args.v8x_images), read_shard(train[0])):
                    w.write(key, sample)
            row = compare("yolov8x.yaml (random)", big, w.paths, few, workers, 1, args.v8x_images)
        print(json.dumps(row), flush=True)

    for copies in args.rss:
        row = {"rss": f"{copies}x demo shards", **peak_rss(args.params, train, copies, args.threads)}
        print(json.dumps(row), flush=True)
    print(json.dumps({"loadavg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
