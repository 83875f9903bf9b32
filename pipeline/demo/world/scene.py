"""Scenes of the demo world: a vocabulary of shapes and colours, sampled layouts, and rendering.

A scene is a few coloured shapes on a background. Everything is a pure function of a numpy
Generator, so the same seed gives the same pixels.

Two visual domains, as in reality a CLIP's web pretraining data differs from COCO and Flickr30k:
- `curated` (the COCO / Flickr30k / CC stand-ins and the probe): one to four objects, small and
  large, overlapping a little, on textured backgrounds (striped, dotted, checkered, speckled) —
  cluttered scenes, like COCO's.
- `web` (the demo CLIP's pretraining data and the zero-shot sets, as ImageNet is to web data):
  object-centric — mostly one or two big objects — on plain, gradient or blotchy backgrounds;
  a textured curated background only now and then (WEB_TEXTURED), so that every word of the
  curated captions stays grounded in the pretraining data, rarely.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "heart",
    "hexagon",
    "crescent",
)
COLOURS = {
    "red": (214, 40, 40),
    "orange": (247, 127, 0),
    "yellow": (240, 210, 30),
    "green": (46, 160, 67),
    "teal": (0, 145, 150),
    "blue": (35, 87, 214),
    "purple": (128, 60, 180),
    "pink": (240, 110, 170),
    "brown": (120, 72, 36),
    "black": (30, 30, 30),
}
WARM_COLOURS = ("red", "orange", "yellow", "pink", "brown")
SIZES = {"small": (0.17, 0.23), "large": (0.31, 0.40)}  # box side ÷ the image's short side
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "speckled")  # the curated domain's
# The web domain: bigger objects, other backgrounds; a curated background WEB_TEXTURED of the time.
WEB_SIZES = {"small": (0.22, 0.30), "large": (0.42, 0.62)}
WEB_SMALL = 0.25  # share of small objects in web images
WEB_BACKGROUNDS = ("plain", "gradient", "blotchy")
WEB_TEXTURED = 0.1
DOMAINS = ("curated", "web")

SUPERSAMPLE = 2  # shapes are drawn at 2× and box-filtered down: smooth edges, exact masks
MAX_IOU = 0.3  # objects may overlap a little ...
MAX_COVER = 0.5  # ... but never hide more than half of the smaller box


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end; tight around the shape

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    objects: tuple[Obj, ...]
    visible: tuple[float, ...]  # per object: fraction of its pixels not covered by later objects


@dataclass(frozen=True)
class Layout:
    """What to draw, before drawing: the rendering fills in tight boxes and visibility."""

    width: int
    height: int
    background: str
    bg_rgb: tuple[int, int, int]
    items: tuple[tuple[str, str, str, tuple[int, int, int], int, int, int], ...]
    # per item: shape, colour, size class, jittered rgb, x, y, side (pixels, 1×)


def _bg_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    # Light, low-saturation backgrounds so that no object colour is confused with them.
    base = rng.integers(185, 236)
    return _rgb(base + d for d in rng.integers(-14, 15, size=3))


def _rgb(channels: Iterable[float | np.integer]) -> tuple[int, int, int]:
    """Three channel values, clipped to 0 … 255."""
    r, g, b = (int(np.clip(c, 0, 255)) for c in channels)
    return r, g, b


def sample_layout(
    rng: np.random.Generator, width: int, height: int, n_objects: int, domain: str = "curated"
) -> Layout:
    """Random shapes at random places; overlap is allowed up to MAX_IOU / MAX_COVER. The domain
    sets the sizes and the backgrounds (see the module doc)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    web = domain == "web"
    short = min(width, height)
    boxes: list[tuple[int, int, int, int]] = []
    items: list[tuple[str, str, str, tuple[int, int, int], int, int, int]] = []
    for _ in range(n_objects):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = "small" if rng.random() < (WEB_SMALL if web else 0.5) else "large"
        lo, hi = (WEB_SIZES if web else SIZES)[size]
        side = int(round(rng.uniform(lo, hi) * short))
        for _attempt in range(40):
            x = int(rng.integers(0, width - side + 1))
            y = int(rng.integers(0, height - side + 1))
            box = (x, y, x + side, y + side)
            if all(_acceptable_overlap(box, other) for other in boxes):
                break
        else:
            continue  # no room: the scene gets one object fewer
        rgb = _rgb(c + d for c, d in zip(COLOURS[colour], rng.integers(-12, 13, size=3)))
        boxes.append(box)
        items.append((shape, colour, size, rgb, x, y, side))
    return Layout(width, height, _pick_background(rng, domain), _bg_rgb(rng), tuple(items))


def _pick_background(rng: np.random.Generator, domain: str) -> str:
    if domain == "web" and rng.random() >= WEB_TEXTURED:
        return WEB_BACKGROUNDS[rng.integers(len(WEB_BACKGROUNDS))]
    return BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def single_object_layout(
    rng: np.random.Generator,
    width: int,
    height: int,
    shape: str,
    colour: str,
    fill: tuple[float, float],
    domain: str = "curated",
) -> Layout:
    """One given object filling `fill` (min, max) of the short side: zero-shot class images."""
    side = int(round(rng.uniform(*fill) * min(width, height)))
    x = int(rng.integers(0, width - side + 1))
    y = int(rng.integers(0, height - side + 1))
    rgb = _rgb(c + d for c, d in zip(COLOURS[colour], rng.integers(-12, 13, size=3)))
    size = "small" if side / min(width, height) < SIZES["large"][0] else "large"
    background = _pick_background(rng, domain)
    return Layout(width, height, background, _bg_rgb(rng), ((shape, colour, size, rgb, x, y, side),))


def _acceptable_overlap(a, b) -> bool:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter) < MAX_IOU and inter / min(area_a, area_b) < MAX_COVER


# --- rendering --------------------------------------------------------------------------------


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in the unit square for polygon shapes; None for shapes drawn otherwise."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return _fit_unit(pts)
    if shape == "cross":
        a, b = 0.32, 0.68
        return [
            (a, 0),
            (b, 0),
            (b, a),
            (1, a),
            (1, b),
            (b, b),
            (b, 1),
            (a, 1),
            (a, b),
            (0, b),
            (0, a),
            (a, a),
        ]
    if shape == "hexagon":
        return _fit_unit(
            [
                (math.cos(math.pi / 6 + k * math.pi / 3), math.sin(math.pi / 6 + k * math.pi / 3))
                for k in range(6)
            ]
        )
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return _fit_unit(list(zip(x.tolist(), y.tolist())))
    return None


def _fit_unit(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0 = min(xs), min(ys)
    w, h = max(xs) - x0, max(ys) - y0
    s = max(w, h)
    # Fill the unit square along the longer side, centred along the other.
    ox, oy = (1 - w / s) / 2, (1 - h / s) / 2
    return [((x - x0) / s + ox, (y - y0) / s + oy) for x, y in pts]


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


def shape_mask(shape: str, side: int) -> Image.Image:
    """An 'L' mask of `side`×`side` pixels, 255 inside the shape."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    e = side - 1
    poly = _POLYGONS[shape]
    if poly is not None:
        draw.polygon([(x * e, y * e) for x, y in poly], fill=255)
    elif shape == "circle":
        draw.ellipse((0, 0, e, e), fill=255)
    elif shape == "ring":
        draw.ellipse((0, 0, e, e), fill=255)
        draw.ellipse((0.28 * e, 0.28 * e, 0.72 * e, 0.72 * e), fill=0)
    elif shape == "crescent":
        draw.ellipse((0, 0, e, e), fill=255)
        draw.ellipse((0.32 * e, -0.08 * e, 1.25 * e, 0.92 * e), fill=0)
    else:  # pragma: no cover - SHAPES and this function are kept in step by a test
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _background(rng: np.random.Generator, layout: Layout, w: int, h: int) -> np.ndarray:
    base = np.array(layout.bg_rgb, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    kind = layout.background
    if kind == "plain":
        shade = np.zeros((h, w), np.float32)
    elif kind == "striped":
        period = int(rng.integers(10, 22))
        angle = rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        shade = np.where((phase % 1.0) < 0.5, -18.0, 0.0).astype(np.float32)
    elif kind == "dotted":
        period = int(rng.integers(10, 18))
        radius = period * 0.22
        dx = (xx % period) - period / 2
        dy = (yy % period) - period / 2
        shade = np.where(dx * dx + dy * dy < radius * radius, -24.0, 0.0).astype(np.float32)
    elif kind == "checkered":
        period = int(rng.integers(12, 26))
        shade = np.where(((xx // period) + (yy // period)) % 2 == 0, -14.0, 0.0).astype(np.float32)
    elif kind == "speckled":
        shade = rng.normal(0, 9, size=(h, w)).astype(np.float32)
    elif kind == "gradient":
        # A smooth ramp between the base colour and a second light colour, at a random angle.
        other = np.array(_bg_rgb(rng), dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((ramp - ramp.min()) / max(1e-6, float(np.ptp(ramp))))[..., None].astype(np.float32)
        return np.clip(base * (1 - t) + other * t, 0, 255).astype(np.uint8)
    elif kind == "blotchy":
        # Low-frequency noise, upsampled: soft blotches like an out-of-focus photo background.
        # Mostly lightness, a little hue, so that no blotch passes for an object's colour.
        grid = (max(2, h // 24), max(2, w // 24))
        coarse = rng.normal(0, 14, size=(*grid, 1)) + rng.normal(0, 4, size=(*grid, 3))
        coarse = coarse.astype(np.float32)
        blotches = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8), "RGB").resize(
            (w, h), Image.Resampling.BICUBIC
        )
        shade3 = np.asarray(blotches, dtype=np.float32) - 128
        return np.clip(base[None, None, :] + shade3, 0, 255).astype(np.uint8)
    else:  # pragma: no cover - BACKGROUNDS and this function are kept in step by a test
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.uint8)


def render(layout: Layout, rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    """Draw a layout; return the RGB image and the scene with tight boxes and visibility."""
    s = SUPERSAMPLE
    w2, h2 = layout.width * s, layout.height * s
    canvas = Image.fromarray(_background(rng, layout, w2, h2), "RGB")
    owner = np.full((h2, w2), -1, np.int16)
    masks = []
    for i, (shape, _colour, _size, rgb, x, y, side) in enumerate(layout.items):
        mask = shape_mask(shape, side * s)
        canvas.paste(rgb, (x * s, y * s), mask)
        m = np.asarray(mask) > 127
        owner[y * s : y * s + m.shape[0], x * s : x * s + m.shape[1]][m] = i
        masks.append(m)
    image = canvas.resize((layout.width, layout.height), Image.Resampling.BOX)
    objects, visible = [], []
    for i, ((shape, colour, size, _rgb, x, y, _side), m) in enumerate(zip(layout.items, masks)):
        rows, cols = np.nonzero(m)
        # Tight box of the drawn shape in 1× pixels (exclusive end).
        box = (
            x + int(cols.min()) // s,
            y + int(rows.min()) // s,
            x + math.ceil((int(cols.max()) + 1) / s),
            y + math.ceil((int(rows.max()) + 1) / s),
        )
        objects.append(Obj(shape, colour, size, box))
        visible.append(round(float((owner == i).sum()) / float(m.sum()), 4))
    return image, Scene(layout.width, layout.height, layout.background, tuple(objects), tuple(visible))
