"""Throughput and memory of the embed stage, measured in one run.

    python benchmarks/embed_throughput.py [--params params.yaml] [--curated data/curated]
        [--regions data/regions.parquet] [--pairs 400] [--pairs-b32 64] [--rss-pairs 500]
        [--repeats 2] [--threads 1]

For the demo CLIP and a random-initialised ViT-B-32, on the same pairs of the curated demo shards
and their detect regions (computed with the demo detector when --regions does not exist), with
the params' embed settings (and detect settings for those regions), --batch-size aside:

- the stage: `pipeline.embed.embed` on a fresh scratch folder (decode, crop, preprocess, image
  and text towers, weights, Parquet and teacher shards), crops/s and captions/s;
- bare `encode_image` on the same crops, preprocessed beforehand and off the clock, in batches of
  the stage's size; and bare open_clip `encode_text` on the same captions;
- ratio = bare encode_image time ÷ stage time (the stage's crops/s ÷ bare crops/s; the stage also
  encodes the captions), and model ratio = (bare encode_image + bare encode_text) ÷ stage;
- cpu ratio = the same as ratio in CPU seconds of every thread of the process: where other
  processes compete for the cores, the stage's decoding threads take their share from them and
  the wall-clock ratio flatters the stage; the CPU ratio is what an idle machine would see, where
  decoding competes with the model (exact with --threads 1: OpenMP threads spin while waiting).

Each figure is the best of --repeats (the machine may be shared: on an oversubscribed CPU, OpenMP's
spinning barriers make 2-thread forward passes erratic, and --threads 1 gives steadier figures).
Then the peak RSS (VmHWM) of the whole stage in a fresh process at 1× and 4× the pairs (the 4×
data: the same samples under new keys).
Prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import pipeline.embed as emb
from pipeline import config, images, regions
from pipeline.config import Params, load_params
from pipeline.curate import TRAIN_SCHEMA
from pipeline.detect import REGIONS_SCHEMA
from pipeline.models.clip import ClipModel, Encoder, load_encoder
from pipeline.shards import ShardWriter, read_shard
from pipeline.tables import write_table

DEMO = ("DCLIP-Demo-RN64", "demo/weights/clip-DCLIP-Demo-RN64.pt")
B32 = ("ViT-B-32", "none")
# The stage's inputs, as subset makes them: the shards, the manifest and the regions table. A
# fixed-length tuple, so that mypy can check `emb.embed(*data, ...)`.
Data = tuple[list[Path], Path, Path]


def subset(
    curated: Path, regions_table: Path, out: Path, pairs: int, copies: int = 1, shard_size: int = 250
) -> Data:
    """The first `pairs` training pairs as their own curated shards, manifest and regions table,
    `copies` times under new keys; returns (shards, manifest, regions)."""
    samples = []
    for shard in sorted((curated / "train").glob("*.tar")):
        for key, sample in read_shard(shard):
            samples.append((key, sample))
            if len(samples) == pairs:
                break
        if len(samples) == pairs:
            break
    manifest = pq.read_table(curated / "train.parquet")
    manifest = {
        r["key"]: r
        for r in manifest.filter(pc.is_in(manifest["key"], pa.array([k for k, _ in samples]))).to_pylist()
    }
    dets = pq.read_table(regions_table)
    dets = {r["key"]: r for r in dets.filter(pc.is_in(dets["key"], pa.array(list(manifest)))).to_pylist()}
    rows, det_rows = [], []
    with ShardWriter(out / "curated" / "train", max_count=shard_size) as writer:
        for c in range(copies):
            for key, sample in samples:
                new = f"{key}-x{c}"
                written = writer.write(new, sample)
                rows.append(
                    {
                        **manifest[key],
                        "key": new,
                        "image": f"{manifest[key]['image']}-x{c}",
                        "shard": f"train/{written}",
                    }
                )
                det_rows.append({**dets[key], "key": new, "shard": written})
    write_table(out / "curated" / "train.parquet", rows, TRAIN_SCHEMA)
    write_table(out / "regions.parquet", det_rows, REGIONS_SCHEMA)
    return (
        sorted((out / "curated" / "train").glob("*.tar")),
        out / "curated" / "train.parquet",
        out / "regions.parquet",
    )


def stage(data: Data, encoder: Encoder, settings: emb.Settings, work: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds (every thread of this process) of the whole stage, and its metrics."""
    shutil.rmtree(work, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    metrics = emb.embed(*data, work / "out", work / "scratch", encoder, settings, 2, False)
    return time.perf_counter() - start, time.process_time() - cpu, metrics


def bare_inputs(data: Data, encoder: Encoder, settings: emb.Settings) -> tuple[list[torch.Tensor], list[str]]:
    """The stage's crops, preprocessed, in batches; and the captions."""
    shards, _, regions_table = data
    crops, captions = [], []
    for shard in shards:
        dets = emb.read_detections(regions_table, shard.name)
        for key, sample in read_shard(shard):
            image = images.decode(sample["jpg"])
            d = dets[key]
            keep = len(d.boxes) if settings.max_regions is None else settings.max_regions - 1
            cut = regions.crop_boxes(d.boxes[:keep], image.width, image.height, settings.context_margin)
            crops += [encoder.preprocess(c) for c in regions.crops(image, cut)]
            captions.append(sample["txt"].decode())
    b = settings.batch_size
    return [torch.stack(crops[i : i + b]) for i in range(0, len(crops), b)], captions


@torch.inference_mode()
def bare(encoder: Encoder, batches: list[torch.Tensor], captions: list[str], b: int) -> tuple[float, ...]:
    """Wall and CPU seconds of encode_image over the batches, and wall seconds of encode_text
    over the captions."""
    net = cast(ClipModel, encoder.net)  # the model itself, not the Encoder's methods
    start, cpu = time.perf_counter(), time.process_time()
    for x in batches:
        net.encode_image(x)
    t_img, cpu_img = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    for i in range(0, len(captions), b):
        net.encode_text(encoder.tokenizer(captions[i : i + b]))
    return t_img, cpu_img, time.perf_counter() - start


def throughput(
    name: str, spec: tuple[str, str], data: Data, settings: emb.Settings, repeats: int, work: Path
) -> dict:
    encoder = load_encoder(*spec, device="cpu")
    batches, captions = bare_inputs(data, encoder, settings)
    bare(encoder, batches[:1], captions[: settings.batch_size], settings.batch_size)  # warm-up
    best = dict.fromkeys(("stage", "stage_cpu", "img", "img_cpu", "txt"), float("inf"))
    for _ in range(repeats):  # interleaved, so that both see the same machine
        seconds, cpu, metrics = stage(data, encoder, settings, work)
        t_img, cpu_img, t_txt = bare(encoder, batches, captions, settings.batch_size)
        for k, v in zip(best, (seconds, cpu, t_img, cpu_img, t_txt)):
            best[k] = min(best[k], v)
    crops, pairs = metrics["regions"], metrics["pairs"]
    assert crops == sum(len(x) for x in batches) and pairs == len(captions)
    row = {
        "model": name,
        "pairs": pairs,
        "crops": crops,
        "stage_s": round(best["stage"], 2),
        "stage_crops_per_s": round(crops / best["stage"], 1),
        "stage_captions_per_s": round(pairs / best["stage"], 1),
        "bare_encode_image_crops_per_s": round(crops / best["img"], 1),
        "bare_encode_text_captions_per_s": round(pairs / best["txt"], 1),
        "ratio": round(best["img"] / best["stage"], 3),
        "model_ratio": round((best["img"] + best["txt"]) / best["stage"], 3),
        "cpu_ratio": round(best["img_cpu"] / best["stage_cpu"], 3),
    }
    print(json.dumps(row), flush=True)
    return row


def rss_child(params_file: Path, folder: Path) -> None:
    """In a fresh process: the whole stage on the data in `folder`, with the params' embed
    settings as they are, then the peak RSS."""
    data = (
        sorted((folder / "curated" / "train").glob("*.tar")),
        folder / "curated" / "train.parquet",
        folder / "regions.parquet",
    )
    encoder = load_encoder(*DEMO, device="cpu")
    step = config.settings(emb.Settings, load_params(params_file).embed)
    metrics = emb.embed(*data, folder / "out", folder / "scratch", encoder, step, 2, False)
    # VmHWM, the peak of this process's own memory: getrusage's ru_maxrss survives exec and so
    # starts at the parent's RSS (Linux keeps it in the signal struct).
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "pairs": metrics["pairs"],
                "peak_rss_mb": round(hwm / 1024, 1),
                "ru_maxrss_mb": round(maxrss / 1024, 1),
            }
        )
    )


def peak_rss(
    params_file: Path, curated: Path, regions_table: Path, pairs: int, copies: int, work: Path
) -> dict:
    folder = work / f"rss-{copies}x"
    shutil.rmtree(folder, ignore_errors=True)
    subset(curated, regions_table, folder, pairs, copies)
    child = [sys.executable, __file__, "--params", str(params_file), "--rss-child", str(folder)]
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"rss": f"{copies}x", **row}), flush=True)
    return row


def ensure_regions(params: Params, curated: Path, regions_table: Path, work: Path) -> Path:
    if regions_table.is_file():
        return regions_table
    from pipeline.detect import Settings, detect
    from pipeline.models import detector as yolo

    print(f"{regions_table} not found: detecting with the demo detector", file=sys.stderr)
    model = yolo.load("yolov8n.yaml", "demo/weights/yolo-demo-v8n.pt", 160, "cpu")
    # The params' detect settings, as stages/detect.py builds them.
    cfg = params.detect
    classes = model.class_ids(cfg.classes)
    step = config.settings(Settings, cfg, classes=tuple(classes) if classes is not None else None)
    shard = sorted((curated / "train").glob("*.tar"))[:1]
    out = work / "regions.parquet"
    detect(shard, out, work / "detect-scratch", model, step, 2, False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="embed and detect settings")
    parser.add_argument("--curated", type=Path, default=Path("data/curated"))
    parser.add_argument("--regions", type=Path, default=Path("data/regions.parquet"))
    parser.add_argument("--pairs", type=int, default=400, help="pairs timed with the demo CLIP")
    parser.add_argument("--pairs-b32", type=int, default=64, help="pairs timed with ViT-B-32")
    parser.add_argument("--rss-pairs", type=int, default=500, help="the 1× size of the memory test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args.params, args.rss_child)

    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        params = load_params(args.params)
        regions_table = ensure_regions(params, args.curated, args.regions, work)
        step = config.settings(emb.Settings, params.embed)
        step = replace(step, batch_size=args.batch_size)  # the knob this benchmark varies
        rows = []
        for name, spec, pairs in (("demo", DEMO, args.pairs), ("ViT-B-32", B32, args.pairs_b32)):
            data = subset(args.curated, regions_table, work / f"data-{name}", pairs)
            rows.append(throughput(name, spec, data, step, args.repeats, work / "stage"))
        one = peak_rss(args.params, args.curated, regions_table, args.rss_pairs, 1, work)
        four = peak_rss(args.params, args.curated, regions_table, args.rss_pairs, 4, work)
        summary = {
            "ratio_goal_0.85": {r["model"]: r["ratio"] for r in rows},
            "model_ratio": {r["model"]: r["model_ratio"] for r in rows},
            "cpu_ratio": {r["model"]: r["cpu_ratio"] for r in rows},
            "peak_rss_4x_over_1x": round(four["peak_rss_mb"] / one["peak_rss_mb"], 3),
            "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
