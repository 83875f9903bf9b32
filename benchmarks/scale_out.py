"""The Ray backend against the local one, per shard-wise stage, measured in one run on this
machine; then a projection of the paper recipe's and CC3M's wall time on 1, 8 and 64 GPUs.

    python benchmarks/scale_out.py [--params params.yaml] [--shards 4] [--repeats 2]
    python benchmarks/scale_out.py --projection-only   # decode per core and the projection

Needs the demo's curated shards, regions and weights (`dvc repro` first). Each stage's own
function runs over the same shards from an empty scratch folder:

- curate: decoding (read, decode, resize, re-encode) of the demo's raw COCO images, in `workers`
  local processes vs Ray tasks of one CPU on a Ray with as many CPUs;
- detect, embed: `detect()` / `embed()` end to end, workers and model load included;
- evaluate: `SetEncoder.images` vs `RemoteSetEncoder.images` (decode, preprocess, encode).

Three placements: local (this process: its decode threads, torch on all cores), ray ×1 (one Ray
worker with all the CPUs: the same resources, so the ratio is Ray's overhead) and ray ×2 (two
workers of half the CPUs each: what a second worker buys on the same cores). The best of
--repeats runs of each. A local Ray is started once, before the clock: its start (seconds) is
printed apart, as a cluster pays it once per stage.

The projection is arithmetic, printed with its inputs: decode images/s per core measured here at
the recipe's resolution, and GPU throughput *assumed* from each model's GFLOPs at a stated
fraction of the GPU's dense fp16 peak (no GPU was measured). It is a plan, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import timeit
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import backend as be
from pipeline import parallel
from pipeline.config import load_params, settings
from pipeline.curate import Decoder, prepare
from pipeline.detect import Settings as DetectSettings
from pipeline.detect import Worker as DetectWorker
from pipeline.detect import detect
from pipeline.embed import Settings as EmbedSettings
from pipeline.embed import embed
from pipeline.embed.run import Worker as EmbedWorker
from pipeline.evaluate import RemoteSetEncoder, SetEncoder, Worker, load_encoder
from pipeline.models import detector as yolo
from pipeline.models.clip import load_encoder as load_clip
from pipeline.shards import read_shard

# GFLOPs per image of each model's forward pass (image tower at the recipe resolution): open_clip's
# model profile for the CLIP towers, ultralytics' model card for YOLOv8x at 640.
GFLOPS = {"ViT-B-32": 4.4, "ViT-B-16": 17.6, "ViT-L-14": 81.1, "yolov8x@640": 257.8}
PEAK_FP16_TFLOPS = {"A100": 312.0, "H100": 989.0}  # dense tensor-core peak, NVIDIA's data sheets
REGIONS = 6  # YOLO boxes kept per image besides the whole image (assumed for the projection)


def best(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs (garbage collection on, as in a stage)."""
    return min(timeit.repeat(fn, setup="gc.enable()", number=1, repeat=repeats))


def startup(backend: be.Backend, factory) -> float:
    """Seconds to start the workers and load their model (what a stage pays before any shard)."""

    def up() -> None:
        with backend.start(factory) as workers:
            workers.ask("key")

    return best(up, 2)


def placements(cpus: int) -> dict[str, be.Backend]:
    return {
        "local": be.Backend("local", threads=cpus),
        "ray x1": be.Backend("ray", workers=1, cpus_per_worker=cpus, threads=cpus),
        "ray x2": be.Backend("ray", workers=2, cpus_per_worker=max(1, cpus // 2), threads=max(1, cpus // 2)),
    }


def sub_manifest(manifest: Path, shards: list[Path], out: Path) -> Path:
    t = pq.read_table(manifest)
    names = pc.replace_substring_regex(t.column("shard"), pattern=r"^.*/", replacement="")
    keep = pc.is_in(names, value_set=pa.array([s.name for s in shards]))
    pq.write_table(t.filter(keep), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decode-images", type=int, default=2000)
    ap.add_argument("--recipe-size", type=int, default=480, help="curate.image_size of the paper recipes")
    ap.add_argument(
        "--projection-only", action="store_true", help="decode per core and the projection alone (no Ray)"
    )
    args = ap.parse_args()
    params = load_params(args.params)
    root = args.params.parent
    raw = sorted((root / params.sources.root).rglob("*.jpg"))[: args.decode_images]
    if args.projection_only:
        project(report_feed(raw[:60], args.recipe_size, args.repeats))
        return
    import ray

    cpus = torch.get_num_threads()
    curated = root / params.curate.out
    shards = sorted((curated / "train").glob("*.tar"))[: args.shards]
    images = sum(1 for s in shards for _ in read_shard(s))
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Until Ray's pre-started worker processes are up: their start would otherwise fall in the
    # first measurement (the local one) and slow it.
    ray.get([ray.remote(num_cpus=1)(_nothing).remote() for _ in range(2 * cpus)])
    ray_start = time.perf_counter() - start
    rows: dict[str, dict[str, float]] = {}  # items/s, whole stage
    starts: dict[str, dict[str, float]] = {}  # seconds to start the workers, model loaded
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    places = placements(cpus)

    # curate's decoding: pure functions over raw files.
    fn = partial(prepare, size=params.curate.image_size, quality=params.curate.jpeg_quality)
    jobs = [(i, str(p)) for i, p in enumerate(raw)]

    def decode(backend: be.Backend) -> tuple[float, float]:
        """(whole, steady) seconds: a first pass over the jobs with the pool's start (spawned
        processes start on demand, each importing the pipeline: about a second here), then a
        second pass on the warm pool."""
        start = time.perf_counter()
        with Decoder(backend) as decoder:
            for _ in decoder.map(fn, jobs):
                pass
            warm = time.perf_counter()
            for _ in decoder.map(fn, jobs):
                pass
            end = time.perf_counter()  # before the pool's shutdown (joining processes: a second)
        return warm - start, end - warm

    def decode_rates(backend: be.Backend) -> tuple[float, float]:
        runs = [decode(backend) for _ in range(args.repeats)]
        return len(jobs) / min(w for w, _ in runs), len(jobs) / min(s for _, s in runs)

    rows["curate (decode)"] = {}
    for name, b in places.items():
        rows["curate (decode)"][name], rows["curate (decode)"][f"{name} steady"] = decode_rates(b)
    rows["curate (decode)"]["one core"] = decode_rates(be.Backend(threads=1))[1]

    # detect
    d = params.detect
    detect_settings = settings(DetectSettings, d, classes=None, batch_size=params.runtime.batch_size.detect)
    load_yolo = partial(
        yolo.load, params.detector.model, str(root / params.detector.checkpoint), d.imgsz, "cpu"
    )

    def run_detect(backend: be.Backend, out: Path) -> None:
        model = load_yolo() if backend.kind == "local" else load_yolo
        scratch = work / "detect-scratch"
        detect(shards, out, scratch, model, detect_settings, backend.threads, False, backend)
        for p in scratch.rglob("*.parquet"):
            p.unlink()

    rows["detect"] = {
        n: images / best(partial(run_detect, b, work / f"regions-{i}.parquet"), args.repeats)
        for i, (n, b) in enumerate(places.items())
    }
    starts["detect"] = {
        n: startup(b, partial(DetectWorker, load_yolo, detect_settings, b.threads)) for n, b in places.items()
    }

    # embed, on the regions of the local run
    manifest = sub_manifest(curated / "train.parquet", shards, work / "train.parquet")
    regions = work / "regions-0.parquet"
    load = partial(load_clip, params.clip.model, str(root / params.clip.checkpoint), "cpu")
    embed_settings = settings(EmbedSettings, params.embed, batch_size=params.runtime.batch_size.embed)
    pairs = pq.ParquetFile(manifest).metadata.num_rows

    def run_embed(backend: be.Backend, i: int) -> None:
        encoder = load() if backend.kind == "local" else load
        embed(
            shards,
            manifest,
            regions,
            work / f"emb-{i}",
            work / f"embed-scratch-{i}",
            encoder,
            embed_settings,
            backend.threads,
            False,
            backend,
        )
        for p in (work / f"embed-scratch-{i}").glob("*/*"):
            shutil.rmtree(p)

    rows["embed"] = {
        n: pairs / best(partial(run_embed, b, i), args.repeats) for i, (n, b) in enumerate(places.items())
    }
    starts["embed"] = {
        n: startup(b, partial(EmbedWorker, load, embed_settings, b.threads)) for n, b in places.items()
    }

    # evaluate's image encoding
    keys = [k for s in shards for k, _ in read_shard(s)]
    names = [s.name for s in shards for _ in read_shard(s)]
    load_eval = partial(load_encoder, params.clip.model, str(root / params.clip.checkpoint), "cpu")
    batch = params.runtime.batch_size.evaluate

    def run_eval(backend: be.Backend) -> None:
        if backend.kind == "local":
            SetEncoder(load_eval(), batch, parallel.count(backend.threads), progress=False).images(
                curated / "train", keys, names
            )
            return
        with backend.start(partial(Worker, load_eval, batch, backend.threads)) as workers:
            RemoteSetEncoder(workers, batch, progress=False).images(curated / "train", keys, names)

    rows["evaluate (images)"] = {
        n: len(keys) / best(partial(run_eval, b), args.repeats) for n, b in places.items()
    }
    starts["evaluate (images)"] = {
        n: startup(b, partial(Worker, load_eval, batch, b.threads)) for n, b in places.items()
    }
    ray.shutdown()
    counts = {"curate (decode)": len(jobs), "detect": images, "embed": pairs, "evaluate (images)": len(keys)}
    for stage, secs in starts.items():  # the rate once the workers are up, model loaded
        for n in places:
            rows[stage][f"{n} steady"] = counts[stage] / (counts[stage] / rows[stage][n] - secs[n])

    print(
        f"# {len(shards)} demo shards ({images} images, {pairs} pairs), {cpus} CPUs; "
        f"a local Ray started in {ray_start:.1f} s (once, before the clock)"
    )
    print(
        "| stage | local items/s | ray ×1 items/s | ray ×1 ÷ local | steady: ray ×1 ÷ local "
        "| steady: ray ×2 ÷ ray ×1 | worker start, local / ray ×1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for stage, r in rows.items():
        st = starts.get(stage)
        if st:
            start_cell = f"{st['local']:.1f} s / {st['ray x1']:.1f} s"
            whole = f"{r['ray x1'] / r['local']:.2f}"
        else:
            # Not comparable whole: the local pool spawns its processes (each importing this
            # script's modules), while Ray's task workers were started with Ray, before the clock.
            start_cell = f"{jobs_start(r, len(jobs)):.1f} s / (started with Ray)"
            whole = "—"
        print(
            f"| {stage} | {r['local']:.0f} | {r['ray x1']:.0f} | {whole} "
            f"| {r['ray x1 steady'] / r['local steady']:.2f} | {r['ray x2 steady'] / r['ray x1 steady']:.2f} "
            f"| {start_cell} |"
        )
    feed = report_feed(raw[:60], args.recipe_size, args.repeats)
    project(feed)
    print(json.dumps({"rows": rows, "starts": starts, "ray_start_s": ray_start, "per_core": feed}))


def jobs_start(rates: dict[str, float], jobs: int) -> float:
    """Seconds the local process pool took to start: its first pass less a warm pass."""
    return jobs / rates["local"] - jobs / rates["local steady"]


def _nothing() -> None:
    return None


def report_feed(raw: list[Path], size: int, repeats: int) -> dict[str, float]:
    feed = decode_per_core(raw, size, repeats)
    print(f"\none core, images at the recipe's stored size ({size} px short side):")
    for what, per_s in feed.items():
        print(f"- {what}: {per_s:.0f} images/s")
    return feed


def project(feed: dict[str, float]) -> None:
    projection(
        feed["decode + CLIP preprocess (224)"],
        feed["decode + YOLO letterbox (640)"],
        feed[f"decode + CLIP preprocess of the image and {REGIONS} crops"],
    )


def decode_per_core(raw: list[Path], size: int, repeats: int) -> dict[str, float]:
    """Images/s on one core (torch on one thread) of what feeds a GPU: decoding a stored JPEG of
    the recipe's size (the demo's raw images, scaled up and re-encoded at quality 90, as curate
    stores them) and CLIP's 224 px preprocessing (of the image alone, as evaluate and distill need,
    or of the image and its crops, as embed does), or YOLO's 640 px letterbox."""
    import open_clip
    from PIL import Image

    from pipeline import images, regions
    from pipeline.runtime import import_ultralytics

    def with_boxes(img: Image.Image) -> tuple[Image.Image, np.ndarray]:
        """The image and REGIONS boxes of a third of its width by half its height: a 3 × 2 grid,
        objects of a typical COCO size."""
        w, h = img.width // 3, img.height // 2
        return img, np.array([(x * w, y * h, (x + 1) * w, (y + 1) * h) for y in range(2) for x in range(3)])

    import_ultralytics()
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(640, auto=False, stride=32)

    stored = []
    for p in raw:
        img = Image.open(p).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        stored.append(images.encode_jpeg(img, 90))
    clip_pre = open_clip.image_transform(224, is_train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for what, fn in {
            "decode only": lambda b: images.decode(b),
            "decode + CLIP preprocess (224)": lambda b: clip_pre(images.decode(b)),
            "decode + YOLO letterbox (640)": lambda b: letterbox(image=np.asarray(images.decode(b))),
            f"decode + CLIP preprocess of the image and {REGIONS} crops": lambda b: [
                clip_pre(c) for c in regions.crops(*with_boxes(images.decode(b)))
            ],
        }.items():
            out[what] = len(stored) / best(lambda fn=fn: [fn(b) for b in stored], repeats)
        return out
    finally:
        torch.set_num_threads(threads)


def projection(
    clip_per_core: float,
    yolo_per_core: float,
    embed_per_core: float,
    utilisation: float = 0.4,
    cores_per_gpu: int = 14,
    regions: int = REGIONS,
    epochs: int = 2,
) -> None:
    """GPU hours of the recipe's GPU stages for the paper's 67k pairs and CC3M on N GPUs.

    Assumed, not measured: a GPU computes at `utilisation` of its dense fp16 peak; a node has
    `cores_per_gpu` cores per GPU for decoding (a DGX H100: 112 cores, 8 GPUs); an image has
    `regions` YOLO boxes kept besides the whole image (embed encodes each crop); distill runs
    `epochs` epochs at 3× a forward pass (forward and backward); one image per pair; the shards
    divide evenly (shards ≫ GPUs). A stage runs at the slower of its GPU and its decoding."""
    print(
        f"\nprojection (assumed: {utilisation:.0%} of dense fp16 peak, {cores_per_gpu} decode cores per GPU, "
        f"{regions:g} regions per image, distill {epochs} epochs; not measured):"
    )
    print(
        "| GPU | CLIP | stage | GPU-bound img/s | cores to feed it | decode-bound img/s "
        "| 67k pairs ×1 / ×8 / ×64 | CC3M ×1 / ×8 / ×64 |"
    )
    print("|---|---|---|---:|---:|---:|---|---|")
    for gpu, peak in PEAK_FP16_TFLOPS.items():
        flops = peak * 1e12 * utilisation
        for clip_model in ("ViT-B-32", "ViT-L-14"):
            stages = {
                "detect (YOLOv8x 640)": (GFLOPS["yolov8x@640"], yolo_per_core, 1),
                "embed (image + crops)": (GFLOPS[clip_model] * (1 + regions), embed_per_core, 1),
                f"distill ({epochs} epochs)": (3 * GFLOPS[clip_model], clip_per_core, epochs),
            }
            for stage, (gflops, per_core, passes) in stages.items():
                gpu_rate = flops / (gflops * 1e9)
                decode_rate = cores_per_gpu * per_core
                rate = min(gpu_rate, decode_rate) / passes
                cells = [
                    " / ".join(_duration(n / (rate * g)) for g in (1, 8, 64)) for n in (67_000, 3_300_000)
                ]
                print(
                    f"| {gpu} | {clip_model} | {stage} | {gpu_rate:,.0f} | {gpu_rate / per_core:,.0f} "
                    f"| {decode_rate:,.0f} "
                    f"| {cells[0]} | {cells[1]} |"
                )


def _duration(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
