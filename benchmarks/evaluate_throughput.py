"""Speed of the evaluate stage, measured in one run.

    python benchmarks/evaluate_throughput.py [--curated data/curated] [--set coco] [--repeats 2]

- metrics: `retrieval_metrics` (both directions, R@k, mAP, MRR) on a COCO-sized problem, 5,000
  images × 25,000 captions of random 512-d unit vectors, and its peak extra memory;
- images: `SetEncoder.images` over a curated set's shards (read, decode, preprocess, encode, at 0
  and 2 workers) against bare `encode_image` on the same images, preprocessed beforehand and off
  the clock, in batches of the same size; ratio = stage images/s ÷ bare images/s.

Each figure is the best of --repeats (the machine may be shared). Prints one JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline import images
from pipeline.evaluate import SetEncoder
from pipeline.metrics import retrieval_metrics
from pipeline.models.clip import Encoder, create
from pipeline.shards import read_shard

DEMO = ("DCLIP-Demo-RN64", "demo/weights/clip-DCLIP-Demo-RN64.pt")


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def metrics_problem(n_images: int, per_image: int, dim: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(n_images * per_image, dim, generator=gen), dim=-1)
    text_image = torch.arange(n_images * per_image) // per_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = best(lambda: retrieval_metrics(img, txt, text_image), repeats)
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "measure": "metrics",
        "images": n_images,
        "captions": n_images * per_image,
        "dim": dim,
        "seconds": round(seconds, 2),
        "peak_extra_MiB": round(extra / 1024, 1),
        "threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def bare_encode(net, batches: list[torch.Tensor]) -> None:
    for b in batches:
        F.normalize(net.encode_image(b), dim=-1)


def image_throughput(curated: Path, name: str, batch_size: int, repeats: int) -> list[dict]:
    folder = "test" if name in ("coco", "flickr30k") else "zeroshot"
    rows = pq.read_table(curated / folder / f"{name}.parquet", columns=["key", "shard"]).to_pylist()
    keys, shards = [r["key"] for r in rows], [r["shard"] for r in rows]
    net, preprocess, tokenizer = create(*DEMO)
    pixels = []
    for shard in dict.fromkeys(shards):
        for _, sample in read_shard(curated / shard):
            ext = "jpg" if "jpg" in sample else "png"
            pixels.append(preprocess(images.decode(sample[ext])))
    batches = [torch.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    bare = best(lambda: bare_encode(net, batches), repeats)
    out = [
        {"measure": "bare encode_image", "set": name, "images": len(keys), "images_per_s": len(keys) / bare}
    ]
    for workers in (0, 2):
        # On the CPU, where create put the model: float32, like the bare loop.
        clip_encoder = Encoder(net, preprocess, tokenizer, torch.device("cpu"))
        enc = SetEncoder(clip_encoder, batch_size, workers, progress=False)
        seconds = best(lambda enc=enc: enc.images(curated, keys, shards), repeats)
        out.append(
            {
                "measure": "SetEncoder.images",
                "set": name,
                "workers": workers,
                "images_per_s": len(keys) / seconds,
                "ratio_to_bare": bare / seconds,
            }
        )
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curated", type=Path, default=Path("data/curated"))
    parser.add_argument("--set", default="coco", help="the curated set whose images are encoded")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(metrics_problem(5000, 5, 512, args.repeats)))
    for row in image_throughput(args.curated, args.set, args.batch_size, args.repeats):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
