"""Regions of an image for the teacher: crops from detector boxes, and their weights.

Region 0 is always the whole image, so an image without detections still has one region. It has
confidence WHOLE_IMAGE_CONFIDENCE (1.0: nothing is more certainly in the picture than the picture)
and area fraction 1.0, class WHOLE_IMAGE_CLASS (-1). Under the paper's `product` weighting it
therefore usually carries most of the weight, with boxes adding detail in proportion to their
size, confidence and agreement with the caption.

Region weights, per (image, caption) pair: a factor per region from YOLO confidence, box area
fraction and s = max(0, cos(region, caption)), chosen by `combination`:

    product   conf × area × s   (the paper)
    conf      conf
    area      area
    sim       s
    uniform   1

normalised to sum 1; when every factor is 0 (say, no region points toward the caption) the
weights fall back to uniform. Pure numpy functions, no model.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image

WHOLE_IMAGE_CONFIDENCE = 1.0
WHOLE_IMAGE_AREA = 1.0
WHOLE_IMAGE_CLASS = -1
WHOLE_IMAGE_NAME = "image"

Combination = Literal["product", "conf", "area", "sim", "uniform"]
COMBINATIONS: tuple[str, ...] = get_args(Combination)


def crop_boxes(boxes: np.ndarray, width: int, height: int, margin: float = 0.0) -> np.ndarray:
    """Integer pixel boxes (n, 4) xyxy to cut from a width × height image: each box widened by
    `margin` × its own width (height) on the left and right (top and bottom), clipped to the
    image, rounded outward to whole pixels, and at least one pixel wide and high."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pad = margin * np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, axis=1) * [-1, -1, 1, 1]
    limit = np.array([width, height, width, height], dtype=np.float64)
    # A float box a hair beyond an integer (130.00001) must not take one more pixel of context.
    out = np.clip(np.round(b + pad, 4), 0, limit)
    out = np.concatenate([np.floor(out[:, :2]), np.ceil(out[:, 2:])], axis=1).astype(np.int64)
    # Degenerate boxes (zero width at an edge): one pixel, inside the image.
    out[:, :2] = np.minimum(out[:, :2], [width - 1, height - 1])
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out


def area_fractions(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each box's area (clipped to the image) as a fraction of the image's, float32 (n,)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = np.clip(b, 0, [width, height, width, height])
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return (area / (width * height)).astype(np.float32)


def with_whole_image(
    boxes: np.ndarray, confidences: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, confidences, area fractions) with region 0, the whole image, first."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    whole = np.array([[0, 0, width, height]], dtype=np.float32)
    conf = np.concatenate([[WHOLE_IMAGE_CONFIDENCE], np.asarray(confidences, dtype=np.float32)])
    area = np.concatenate([[WHOLE_IMAGE_AREA], area_fractions(boxes, width, height)])
    return np.concatenate([whole, boxes]), conf.astype(np.float32), area.astype(np.float32)


def crops(image: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    """The image itself, then the image cut to each integer box (from crop_boxes)."""
    return [image, *(image.crop(tuple(b)) for b in np.asarray(boxes).tolist())]


def cosines(regions: np.ndarray, caption: np.ndarray) -> np.ndarray:
    """cos(region_r, caption) for each row of regions (R, D), in float32; 0 for a zero vector."""
    r = np.asarray(regions, dtype=np.float32)
    c = np.asarray(caption, dtype=np.float32)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c)
    dots = r @ c
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def region_weights(
    confidences: np.ndarray, areas: np.ndarray, similarities: np.ndarray, combination: Combination = "product"
) -> np.ndarray:
    """Weights (R,) float32 summing to 1, from one factor per region (see the module doc);
    negative similarities count as 0; all factors 0 gives uniform weights."""
    conf = np.asarray(confidences, dtype=np.float64)
    area = np.asarray(areas, dtype=np.float64)
    sim = np.clip(np.asarray(similarities, dtype=np.float64), 0.0, None)
    if not conf.shape == area.shape == sim.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError(f"need three equal (R,) arrays, R >= 1; got {conf.shape}, {area.shape}, {sim.shape}")
    factors = {
        "product": lambda: conf * area * sim,
        "conf": lambda: conf,
        "area": lambda: area,
        "sim": lambda: sim,
        "uniform": lambda: np.ones_like(conf),
    }
    if combination not in factors:
        raise ValueError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")
    f = np.clip(factors[combination](), 0.0, None)
    total = f.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(len(f), 1.0 / len(f), dtype=np.float32)
    return (f / total).astype(np.float32)
