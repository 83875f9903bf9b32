"""The demo backbones' pretraining splits: captioned images with YOLO labels, drawn by the world's
painter from seed streams that no pipeline split uses (sources WEB and PRETRAIN)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.config import World
from pipeline.demo.world import formats
from pipeline.demo.world.paint import PRETRAIN, WEB, Job, Painter
from pipeline.demo.world.scene import SHAPES

WORLD_CODE = Path(__file__).parent / "world"
SPLITS = ("train", "val")


def split_jobs(
    split: str, n_train: int, n_val: int, single_object_train: int = 0, domain: str = "web"
) -> list[Job]:
    """The jobs that draw one split's images, in file order: train images are indices
    0 … n_train - 1 of the domain's seed stream (the last `single_object_train` of them hold one
    object each), val images the n_val after them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source, style = (WEB, "web") if domain == "web" else (PRETRAIN, "coco")
    start, n = (0, n_train) if split == "train" else (n_train, n_val)
    first_single = n_train - single_object_train
    return [
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


def generate_pretrain_split(
    cfg: World,
    out: Path | str,
    n_train: int,
    n_val: int,
    single_object_fraction: float = 0.0,
    progress: bool = True,
    domain: str = "web",
    workers: int = 1,
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
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    lines = []
    with Painter(cfg, workers, progress) as painter:
        for split in SPLITS:
            start = 0 if split == "train" else n_train
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            jobs = split_jobs(split, n_train, n_val, summary["single_object_train"], domain)
            for i, sample in enumerate(painter.paint(jobs, f"pretrain {split}")):
                stem = f"{start + i:07d}"
                (tmp / "images" / split / f"{stem}.jpg").write_bytes(sample.jpeg)
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
    generator's code (the world's modules and this one), so that a changed world is never
    mistaken for a cached split."""
    code = hashlib.sha256()
    for path in [*sorted(WORLD_CODE.glob("*.py")), Path(__file__)]:
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
