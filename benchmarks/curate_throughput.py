"""Throughput of curate's image path (read, decode, EXIF, hash, resize, JPEG encode, in the
stage's order-preserving process pool) at 1 and 2 workers, against a bare PIL decode + resize
loop over the same files, measured in one run.

    python benchmarks/curate_throughput.py [--raw demo/raw] [--images 2000] [--size 160]

Files are read once before timing (page cache warm) and the pool is started and warmed before
its clock starts: the figures are steady-state images/s. Prints one JSON line per measurement
and the ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

from PIL import Image

from pipeline.backend import Backend
from pipeline.curate import Decoder, prepare
from pipeline.images import resized_size


def bare_pil(paths: list[Path], size: int) -> float:
    """images/s of Image.open + convert("RGB") + bicubic resize of the short side: no EXIF,
    no hash, no encode, no pool."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        new = resized_size(rgb.width, rgb.height, size)
        if new != rgb.size:
            rgb = rgb.resize(new, Image.Resampling.BICUBIC)
    return len(paths) / (time.perf_counter() - start)


def curate_path(paths: list[Path], size: int, quality: int, workers: int) -> float:
    fn = partial(prepare, size=size, quality=quality)
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    with Decoder(Backend(threads=workers)) as decoder:
        for _ in decoder.map(fn, jobs[: 8 * workers]):  # start and warm the workers
            pass
        start = time.perf_counter()
        n = sum(1 for _ in decoder.map(fn, jobs))
        seconds = time.perf_counter() - start
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=Path("demo/raw"), help="the demo world's folder")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=160, help="curate.image_size")
    parser.add_argument("--quality", type=int, default=90, help="curate.jpeg_quality")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    args = parser.parse_args()

    paths = sorted((args.raw / "coco" / "train2017").glob("*.jpg"))
    paths += sorted((args.raw / "flickr30k" / "flickr30k-images").glob("*.jpg"))
    paths = paths[: args.images]
    if not paths:
        raise SystemExit(f"no images under {args.raw}: run `dclip world` (or `dvc repro`) first")
    for p in paths:
        p.read_bytes()  # page cache

    results = {"bare_pil": max(bare_pil(paths, args.size) for _ in range(args.repeats))}
    for workers in (1, 2):
        results[f"curate_{workers}w"] = max(
            curate_path(paths, args.size, args.quality, workers) for _ in range(args.repeats)
        )
    for name, ips in results.items():
        print(json.dumps({"measure": name, "images": len(paths), "images_per_s": round(ips, 1)}))
    ratios = {
        "curate_1w / bare_pil": results["curate_1w"] / results["bare_pil"],
        "curate_2w / bare_pil": results["curate_2w"] / results["bare_pil"],
        "curate_2w / curate_1w": results["curate_2w"] / results["curate_1w"],
    }
    print(json.dumps({k: round(v, 2) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
