"""The demo world's compositional probe, in SugarCrepe's format and categories.

For a scene, each category makes a (caption, negative_caption) pair from the ground truth: the
caption is true of the image, the negative is false of it by construction, and the two differ
only in the way the category names (an attribute, an object, a relation, or their binding).

- replace_att: a colour that no object in the image has.      "A red circle." / "A green circle."
- replace_obj: a shape that no object in the image has.       "A red circle." / "A red star."
- replace_rel: left↔right or above↔below between two objects that their colour and shape pick out
  alone, standing clearly apart (the captions' own margin).
- swap_att:    the colours of two objects swapped.            "A red circle and a blue star." /
                                                              "A blue circle and a red star."
- swap_obj:    two shapes, each alone of its kind, swapped around a relation.
- add_obj:     an object of a shape absent from the image added.
- add_att:     a colour absent from the image given to a shape that is there.

Only objects at least MIN_VISIBLE visible are spoken of, so that a true caption is plainly true.

`write_probe` draws the probe's images and writes its files (sugarcrepe/<category>.json).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import World
from pipeline.demo.world import formats
from pipeline.demo.world.captions import relation, with_article
from pipeline.demo.world.paint import CAPTION_STREAM, PROBE, GroundTruth, Job, Painter, unique_ids
from pipeline.demo.world.scene import COLOURS, SHAPES, Obj, Scene

CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
MIN_VISIBLE = 0.6
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _choice(rng: np.random.Generator, options):
    options = sorted(options)
    return options[int(rng.integers(len(options)))] if options else None


def _unique(objs: list[Obj], key) -> list[Obj]:
    """Objects alone of their kind by `key` among all objects."""
    return [o for o in objs if sum(key(p) == key(o) for p in objs) == 1]


def probe_pair(scene: Scene, category: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(caption, negative_caption) for the scene in this category, or None where it cannot apply."""
    every = list(scene.objects)
    seen = [o for o, v in zip(scene.objects, scene.visible) if v >= MIN_VISIBLE]
    colours_absent = set(COLOURS) - {o.colour for o in every}
    shapes_absent = set(SHAPES) - {o.shape for o in every}
    by_kind = _unique(every, lambda o: (o.colour, o.shape))
    kind_seen = [o for o in by_kind if o in seen]

    def name(o: Obj, colour: str | None = None, shape: str | None = None) -> str:
        return with_article(f"{colour or o.colour} {shape or o.shape}")

    if category in ("replace_att", "replace_obj", "add_obj", "add_att"):
        o = _choice(rng, [(x.colour, x.shape, i) for i, x in enumerate(seen)])
        if o is None:
            return None
        colour, shape, _ = o
        obj = Obj(shape, colour, "", (0, 0, 0, 0))
        if category == "replace_att":
            other = _choice(rng, colours_absent)
            return None if other is None else (sentence(name(obj)), sentence(name(obj, colour=other)))
        if category == "replace_obj":
            other = _choice(rng, shapes_absent)
            return None if other is None else (sentence(name(obj)), sentence(name(obj, shape=other)))
        if category == "add_obj":
            shape2, colour2 = _choice(rng, shapes_absent), _choice(rng, COLOURS)
            if shape2 is None:
                return None
            return sentence(name(obj)), sentence(f"{name(obj)} and {with_article(f'{colour2} {shape2}')}")
        other = _choice(rng, colours_absent)  # add_att
        return None if other is None else (sentence(with_article(shape)), sentence(name(obj, colour=other)))

    pairs: list[tuple[Obj, Obj]] = []
    if category == "swap_att":
        for i, a in enumerate(seen):
            for b in seen[i + 1 :]:
                swapped = {(b.colour, a.shape), (a.colour, b.shape)}
                present = {(o.colour, o.shape) for o in every}
                # Different colours and shapes, and the swapped pair must not both be there.
                if a.colour != b.colour and a.shape != b.shape and not swapped <= present:
                    pairs.append((a, b))
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return (
            sentence(f"{name(a)} and {name(b)}"),
            sentence(f"{name(a, colour=b.colour)} and {name(b, colour=a.colour)}"),
        )
    text: Callable[..., str]  # an object's words; shape= names another shape
    if category == "replace_rel":
        candidates = kind_seen
        text = name
    elif category == "swap_obj":
        candidates = [o for o in _unique(every, lambda o: o.shape) if o in seen]

        def shape_only(o: Obj, shape: str | None = None) -> str:
            return with_article(shape or o.shape)

        text = shape_only
    else:
        raise ValueError(f"unknown probe category {category!r}; known: {', '.join(CATEGORIES)}")
    related: list[tuple[Obj, Obj, str]] = []
    for a in candidates:
        for b in candidates:
            if a is not b and (rel := relation(a, b, scene)) is not None:
                related.append((a, b, rel))
    if not related:
        return None
    a, b, rel = related[int(rng.integers(len(related)))]
    if category == "replace_rel":
        return (
            sentence(f"{text(a)} {RELATION_WORDS[rel]} {text(b)}"),
            sentence(f"{text(a)} {RELATION_WORDS[OPPOSITE[rel]]} {text(b)}"),
        )
    return (
        sentence(f"{text(a)} {RELATION_WORDS[rel]} {text(b)}"),
        sentence(f"{text(a, shape=b.shape)} {RELATION_WORDS[rel]} {text(b, shape=a.shape)}"),
    )


# --- the probe's files --------------------------------------------------------------------------


def write_probe(cfg: World, root: Path, painter: Painter, truth: GroundTruth) -> dict:
    """sugarcrepe/<category>.json and sugarcrepe/images/*.jpg: fresh two- and three-object scenes,
    each giving at most one item per category; the first `per_category` items of each are kept."""
    p = cfg.probe
    ids = unique_ids(cfg.seed, PROBE, p.images, 700_000, 799_999)  # apart from the COCO ids
    jobs = [Job(PROBE, i, n_objects=2 + i % 2) for i in range(p.images)]
    folder = root / "sugarcrepe" / "images"
    folder.mkdir(parents=True)
    items: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for i, sample in enumerate(painter.paint(jobs, "probe")):
        name = f"{ids[i]:012d}.jpg"
        rng = np.random.default_rng([cfg.seed, PROBE, i, CAPTION_STREAM])
        made = {c: probe_pair(sample.scene, c, rng) for c in CATEGORIES}
        wanted = {c: pair for c, pair in made.items() if pair is not None and len(items[c]) < p.per_category}
        if not wanted:
            continue
        (folder / name).write_bytes(sample.jpeg)
        truth.add(f"sugarcrepe/images/{name}", sample.scene)
        for c, (caption, negative) in wanted.items():
            items[c].append({"filename": name, "caption": caption, "negative_caption": negative})
    short = {c: len(v) for c, v in items.items() if len(v) < p.per_category}
    if short:
        raise ValueError(
            f"world.probe.images: {p.images} images gave too few items for {short} "
            f"(per_category {p.per_category}); raise world.probe.images"
        )
    for c, rows in items.items():
        formats.write_json(root / "sugarcrepe" / f"{c}.json", {str(k): row for k, row in enumerate(rows)})
    return {"images": len(list(folder.iterdir())), "items": {c: len(v) for c, v in items.items()}}
