"""The demo backbones' quality on fresh images, as their cards (demo/weights/*.json) report it.

The CLIP is measured with the project's own definitions: its embeddings come from the encoder
that embed and evaluate use (pipeline.models.clip.Encoder, through evaluate's SetEncoder), and
its figures from pipeline.metrics, laid out as the evaluate stage lays them out. The detector has
no counterpart in the pipeline; its figures are defined here (`detector_quality`).

The fresh images are indices of the world's seed streams beyond everything the pretraining
splits used; a card names them under `held_out` (a ClipHeldOut or DetectorHeldOut), so that
`dclip demo cards` measures committed weights on the very same images again.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipeline import metrics
from pipeline.config import World
from pipeline.demo.pretrain import split_jobs
from pipeline.demo.world.paint import WEB, Job, Painter, Sample
from pipeline.demo.world.scene import SHAPES
from pipeline.demo.world.zeroshot import COLOUR_SHAPE_CLASSES
from pipeline.evalsets import SINGLE_PROMPT
from pipeline.evaluate import RECALL_KS, TOP_KS, SetEncoder
from pipeline.models.clip import Encoder

METRICS = (
    "pipeline.metrics (CLIP_benchmark's convention): a query is a hit at k if any of its positives "
    "is among its k best-scoring candidates; text→image has one positive per caption (its image), "
    "image→text every caption of the image; mAP averages precision over all positives, MRR takes "
    "the best-placed one; ties are broken against the query (a negative scoring the same as a "
    "positive is placed above it; a caption repeated word for word by another image ties exactly, "
    "so it counts against image→text). Zero-shot: one prompt per class, top-k and mean per-class "
    "recall, ties likewise against the image; colour_right and shape_right score the predicted "
    "class (ties against the image too). Chance: the expected figure of a uniformly random ranking."
)
DETECTOR_METRICS = (
    "recall_iou50: objects at least min_visible visible that some box (conf >= conf) overlaps at "
    "IoU >= 0.5, class-agnostic; precision_iou50_class: boxes that overlap an object of their own "
    "class at IoU >= 0.5, over all boxes"
)
BARE_PROMPT = "a {}"
CURATED_FIRST = 5_000_000  # fresh curated-domain scenes: far beyond every split's indices
CURATED_IMAGES = 1000
CLASS_IMAGES_PER_CLASS = 5
DETECTOR_GAP = 1000  # the detector's fresh images start this far beyond the CLIP split
DETECTOR_IMAGES = 300


@dataclass(frozen=True)
class WorldDraw:
    """The world settings that fix a drawing (with a job): the seed, image sizes, object count."""

    seed: int
    image_size: tuple[int, int]
    max_objects: int

    @classmethod
    def of(cls, cfg: World) -> WorldDraw:
        return cls(cfg.seed, (int(cfg.image_size[0]), int(cfg.image_size[1])), cfg.max_objects)

    def world(self) -> World:
        return World(seed=self.seed, image_size=self.image_size, max_objects=self.max_objects)


@dataclass(frozen=True)
class ClipHeldOut:
    """The fresh images of a CLIP card: the web pretraining stream's val images (retrieval in its
    own domain), `per_class` single-object web images of each colour-shape class after the split
    (zero-shot, drawn as the zero-shot sets are) and curated-domain scenes (what the pipeline
    adapts it to)."""

    world: WorldDraw
    val_first: int
    val_images: int
    class_first: int
    per_class: int
    curated_first: int
    curated_images: int

    @classmethod
    def after_split(cls, world: WorldDraw, train_images: int, val_images: int) -> ClipHeldOut:
        """The images a split of train_images + val_images is measured on."""
        return cls(
            world,
            train_images,
            val_images,
            train_images + val_images,
            CLASS_IMAGES_PER_CLASS,
            CURATED_FIRST,
            CURATED_IMAGES,
        )

    @classmethod
    def from_dict(cls, d: dict) -> ClipHeldOut:
        return cls(**{**d, "world": _world_draw(d["world"])})


@dataclass(frozen=True)
class DetectorHeldOut:
    """The fresh images of a detector card: curated-domain scenes, beyond the CLIP's split."""

    world: WorldDraw
    first: int
    images: int
    imgsz: int = 160
    min_visible: float = 0.6
    conf: float = 0.25

    @classmethod
    def after_split(cls, world: WorldDraw, train_images: int, val_images: int) -> DetectorHeldOut:
        return cls(world, train_images + val_images + DETECTOR_GAP, DETECTOR_IMAGES)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorHeldOut:
        return cls(**{**d, "world": _world_draw(d["world"])})


def _world_draw(d: dict) -> WorldDraw:
    return WorldDraw(
        int(d["seed"]), (int(d["image_size"][0]), int(d["image_size"][1])), int(d["max_objects"])
    )


def as_dict(held: ClipHeldOut | DetectorHeldOut) -> dict:
    """A held-out set as a card writes it (JSON: lists, not tuples)."""
    d = asdict(held)
    d["world"]["image_size"] = list(d["world"]["image_size"])
    return d


# --- fresh images --------------------------------------------------------------------------------


def paint(world: WorldDraw, jobs: list[Job], workers: int = 1) -> list[Sample]:
    with Painter(world.world(), workers, progress=False) as painter:
        return list(painter.paint(jobs, "held-out"))


def class_jobs(first: int, per_class: int) -> list[Job]:
    """`per_class` single-object web images of each class of COLOUR_SHAPE_CLASSES, class by class."""
    return [
        Job(WEB, first + k * per_class + j, single=(name.split()[0], name.split()[1]), domain="web")
        for k, name in enumerate(COLOUR_SHAPE_CLASSES)
        for j in range(per_class)
    ]


def image(sample: Sample) -> Image.Image:
    with Image.open(io.BytesIO(sample.jpeg)) as im:
        return im.convert("RGB")


def embed_images(encoder: Encoder, samples: Sequence[Sample], batch: int = 256) -> Tensor:
    """L2-normalised image embeddings, through the encoder's own preprocess."""
    chunks = []
    for start in range(0, len(samples), batch):
        pixels = torch.stack([encoder.preprocess(image(s)) for s in samples[start : start + batch]])
        chunks.append(encoder.encode_images(pixels, normalize=True))
    return torch.cat(chunks)


# --- figures from embeddings ---------------------------------------------------------------------


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def retrieval_figures(image_emb: Tensor, text_emb: Tensor, text_image: Tensor) -> dict:
    """R@k, mAP and MRR both ways and the chance R@k, as the evaluate stage reports a retrieval set."""
    ranks = metrics.retrieval_ranks(image_emb, text_emb, text_image)
    n_images, n_texts = len(image_emb), len(text_emb)
    per_image = torch.bincount(text_image, minlength=n_images)
    chance = {
        "text_to_image": metrics.chance_recall_at_k(n_images, torch.ones(n_texts), RECALL_KS),
        "image_to_text": metrics.chance_recall_at_k(n_texts, per_image, RECALL_KS),
    }
    out: dict = {"images": n_images, "captions": n_texts}
    for direction, r in ranks.items():
        out[direction] = _round(metrics.summarise(r, RECALL_KS))
    out["chance"] = {d: _round({f"R@{k}": v for k, v in c.items()}) for d, c in chance.items()}
    return out


def predictions(scores: Tensor, labels: Tensor) -> Tensor:
    """Each image's predicted class: the best-scoring one, with ties broken against the image as
    pipeline.metrics breaks them (a class that scores the same as the true one is predicted), so
    a prediction is right exactly when metrics counts a top-1 hit."""
    rows = torch.arange(len(labels))
    true = scores[rows, labels]
    others = scores.clone()
    others[rows, labels] = -torch.inf
    best_other, best = others.max(dim=1)
    return torch.where(best_other >= true, best, labels)


def zero_shot_figures(image_emb: Tensor, class_emb: Tensor, labels: Tensor, names: Sequence[str]) -> dict:
    """Top-k and mean per-class recall over "colour shape" classes (pipeline.metrics), how often the
    predicted class has the right colour and the right shape, and chance levels."""
    n = len(names)
    labels = labels.to(torch.int64)
    pred = predictions(image_emb @ class_emb.T, labels).numpy()
    colour = np.array([name.split()[0] for name in names])
    shape = np.array([name.split()[1] for name in names])
    t = labels.numpy()
    return {
        "images": len(labels),
        "classes": n,
        **_round(metrics.zero_shot_metrics(image_emb, class_emb, labels, TOP_KS)),
        "colour_right": round(float((colour[pred] == colour[t]).mean()), 4),
        "shape_right": round(float((shape[pred] == shape[t]).mean()), 4),
        "chance": _round({f"top{k}": min(k, n) / n for k in TOP_KS}),
    }


# --- the CLIP ------------------------------------------------------------------------------------


def retrieval_quality(encoder: Encoder, samples: Sequence[Sample], batch: int = 256) -> dict:
    """Retrieval among the samples, every caption of an image a positive."""
    texts = [c for s in samples for c in s.captions]
    text_image = torch.tensor([i for i, s in enumerate(samples) for _ in s.captions], dtype=torch.int64)
    sets = SetEncoder(encoder, batch, workers=0, progress=False)
    return retrieval_figures(embed_images(encoder, samples, batch=batch), sets.texts(texts), text_image)


def clip_quality(encoder: Encoder, held: ClipHeldOut, workers: int = 1, batch: int = 256) -> dict:
    """A CLIP card's quality: retrieval in the web domain, zero-shot with the paper's prompt (and
    with the bare label), retrieval in the curated domain."""
    val = paint(held.world, split_jobs("val", held.val_first, held.val_images, domain="web"), workers)
    classes = paint(held.world, class_jobs(held.class_first, held.per_class), workers)
    curated = paint(
        held.world, split_jobs("val", held.curated_first, held.curated_images, domain="curated"), workers
    )
    sets = SetEncoder(encoder, batch, workers=0, progress=False)
    class_emb = embed_images(encoder, classes, batch=batch)
    labels = torch.arange(len(COLOUR_SHAPE_CLASSES)).repeat_interleave(held.per_class)
    zero_shot = {
        prompt: zero_shot_figures(
            class_emb, sets.classes(COLOUR_SHAPE_CLASSES, (prompt,)), labels, COLOUR_SHAPE_CLASSES
        )
        for prompt in (SINGLE_PROMPT, BARE_PROMPT)
    }
    return {
        "retrieval": retrieval_quality(encoder, val, batch),
        "zero_shot": {
            "prompt": SINGLE_PROMPT,
            **zero_shot[SINGLE_PROMPT],
            "bare_label": zero_shot[BARE_PROMPT],
        },
        "curated_domain_retrieval": retrieval_quality(encoder, curated, batch),
    }


# --- the detector --------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N×4) with every box in b (M×4), xyxy."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def detector_quality(weights: Path | str, held: DetectorHeldOut, workers: int = 1) -> dict:
    """Class-agnostic recall at IoU 0.5 over objects at least `min_visible` visible, and
    class-aware precision at IoU 0.5, on fresh curated-domain scenes (DETECTOR_METRICS)."""
    from pipeline.models.detector import prepare_ultralytics

    prepare_ultralytics()
    from ultralytics import YOLO
    from ultralytics.engine.results import Results

    model = YOLO(str(weights))
    found = total = tp = n_pred = 0
    for s in paint(held.world, split_jobs("val", held.first, held.images, domain="curated"), workers):
        (r,) = model.predict(image(s), imgsz=held.imgsz, conf=held.conf, device="cpu", verbose=False)
        if not isinstance(r, Results) or r.boxes is None:
            raise TypeError(f"{weights}: not a detector (its predictions hold no boxes)")
        pred = torch.as_tensor(r.boxes.xyxy).numpy()
        pred_cls = torch.as_tensor(r.boxes.cls).numpy().astype(int)
        gt = np.array([o.box for o in s.scene.objects], dtype=float)
        gt_cls = np.array([SHAPES.index(o.shape) for o in s.scene.objects])
        keep = np.array(s.scene.visible) >= held.min_visible
        iou = box_iou(gt, pred) if len(pred) else np.zeros((len(gt), 0))
        matched = np.asarray((iou >= 0.5).any(axis=1), dtype=bool)  # all False when nothing is found
        found += int(matched[keep].sum())
        total += int(keep.sum())
        n_pred += len(pred)
        if len(pred):
            same = (iou >= 0.5) & (gt_cls[:, None] == pred_cls[None, :])
            tp += int(same.any(axis=0).sum())
    return {
        "images": held.images,
        "objects": total,
        "min_visible": held.min_visible,
        "conf": held.conf,
        "recall_iou50": round(found / max(1, total), 4),
        "precision_iou50_class": round(tp / max(1, n_pred), 4),
    }
