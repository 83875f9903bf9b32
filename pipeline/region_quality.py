"""What the detector's crops carry in the base CLIP's space: can regions help a teacher at all?

A teacher built on YOLO regions can only add what the crops' CLIP embeddings hold. This measures
it directly: every detected box of a sample of training images is cropped (with `margin` of
context on each side, a fraction of the box's size, as embed's `context_margin`), embedded by the
base CLIP through its own preprocessing, and classified zero-shot among the detector's class
names ("This is a photo of a {class}"). The detector's own class is the label: the demo's YOLO is
97 % precise on fresh images (its card), COCO's YOLOv8x about as good on COCO's classes. Chance is
one over the number of classes present.

A tight crop fills the whole input; a web-pretrained CLIP mostly saw objects filling half of it.
Measuring several margins tells whether crops at the scale the base saw in pretraining carry more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline import images, regions
from pipeline.errors import InputError
from pipeline.shards import read_shard

PROMPT = "This is a photo of a {}"


class ClipModel(Protocol):
    """What `measure` uses of a CLIP model (open_clip's CLIP and CustomTextCLIP)."""

    def encode_image(self, image: torch.Tensor, /) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, /) -> torch.Tensor: ...


@dataclass(frozen=True)
class Boxes:
    """One image's detected boxes (pixels, xyxy) and their class ids."""

    shard: str
    key: str
    boxes: np.ndarray
    classes: np.ndarray


def zero_shot_accuracy(crop_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of crops whose best-scoring class is their label (embeddings L2-normalised)."""
    if len(crop_emb) == 0:
        raise InputError("no crops to classify")
    return float(((crop_emb @ class_emb.T).argmax(dim=1) == labels).float().mean())


def sample_images(
    regions_table: Path, train_manifest: Path, n: int, seed: int = 0
) -> tuple[list[Boxes], dict[int, str]]:
    """Up to n distinct training images with at least one box, drawn by `seed` (one pair each),
    and the detector's class names by id."""
    columns = ["key", "boxes", "classes", "class_names", "reject"]
    det = pq.read_table(regions_table, columns=columns).to_pylist()
    manifest = pq.read_table(train_manifest, columns=["key", "image", "shard"])
    keys = manifest.column("key").to_pylist()
    image_of = dict(zip(keys, manifest.column("image").to_pylist()))
    shard_of = dict(zip(keys, manifest.column("shard").to_pylist()))  # relative to the curated folder
    first: dict[str, dict] = {}
    names: dict[int, str] = {}
    for row in det:
        names.update(zip(row["classes"], row["class_names"]))
        if row["key"] not in image_of:
            raise InputError(
                f"{regions_table}: key {row['key']!r} is not in {train_manifest}: the regions are "
                "older than the curated shards; run detect again"
            )
        image = image_of[row["key"]]
        if row["reject"] is None and row["boxes"] and image not in first:
            first[image] = row
    rows = sorted(first.values(), key=lambda r: r["key"])
    pick = sorted(np.random.default_rng(seed).permutation(len(rows))[:n])
    sample = [
        Boxes(
            shard_of[rows[i]["key"]],
            rows[i]["key"],
            np.asarray(rows[i]["boxes"], np.float32),
            np.asarray(rows[i]["classes"]),
        )
        for i in pick
    ]
    return sample, dict(sorted(names.items()))


@torch.no_grad()
def measure(
    model: ClipModel,
    preprocess,
    tokenizer,
    curated: Path,
    sample: Sequence[Boxes],
    names: dict[int, str],
    margins: Sequence[float],
    batch_size: int = 256,
) -> dict:
    """Zero-shot accuracy of the sample's crops at each margin among the detector's classes
    (`names`: class id → name), with chance and counts."""
    ids = list(names)
    class_emb = F.normalize(model.encode_text(tokenizer([PROMPT.format(names[c]) for c in ids])), dim=-1)
    by_shard: dict[str, list[Boxes]] = {}
    for b in sample:
        by_shard.setdefault(b.shard, []).append(b)
    crops: dict[float, list[torch.Tensor]] = {m: [] for m in margins}
    labels: list[int] = []
    for shard, wanted in sorted(by_shard.items()):
        keys = {b.key: b for b in wanted}
        for key, member in read_shard(curated / shard):
            if key not in keys:
                continue
            image = images.decode_sample(member)
            if isinstance(image, images.Reject):
                raise InputError(f"{curated / shard}: sample {key!r}: {image.reason}: {image.detail}")
            b = keys[key]
            labels.extend(ids.index(int(c)) for c in b.classes)
            for m in margins:
                cut = regions.crop_boxes(b.boxes, image.width, image.height, m)
                crops[m].extend(preprocess(c) for c in regions.crops(image, cut)[1:])
    if not labels:
        raise ValueError("the sample holds no detected box")
    target = torch.tensor(labels)
    out: dict = {
        "images": len(sample),
        "crops": len(labels),
        "classes": len(ids),
        "chance": round(1 / len(ids), 4),
        "prompt": PROMPT,
        "accuracy_by_margin": {},
    }
    for m in margins:
        x = torch.stack(crops[m])
        emb = torch.cat(
            [
                F.normalize(model.encode_image(x[i : i + batch_size]), dim=-1)
                for i in range(0, len(x), batch_size)
            ]
        )
        out["accuracy_by_margin"][str(m)] = round(zero_shot_accuracy(emb, class_emb, target), 4)
    return out
