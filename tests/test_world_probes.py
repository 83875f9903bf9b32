"""The demo world's compositional probe: SugarCrepe's format, and every caption checked against
the ground truth by a parser of its own — positives true, negatives false."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.demo.world.probes import CATEGORIES, probe_pair
from pipeline.demo.world.scene import COLOURS, SHAPES, Obj, Scene
from tests.helpers import TINY_WORLD

COLOUR = "|".join(COLOURS)
SHAPE = "|".join(SHAPES)
NOUN = rf"an? (?:(?P<{{0}}c>{COLOUR}) )?(?P<{{0}}s>{SHAPE})"
RELATION = r"(?P<rel>to the left of|to the right of|above|below)"
FORMS = [
    re.compile(rf"^{NOUN.format('a')}\.$", re.IGNORECASE),
    re.compile(rf"^{NOUN.format('a')} and {NOUN.format('b')}\.$", re.IGNORECASE),
    re.compile(rf"^{NOUN.format('a')} {RELATION} {NOUN.format('b')}\.$", re.IGNORECASE),
]


def matches(o: dict, colour: str | None, shape: str) -> bool:
    return o["shape"] == shape and (colour is None or o["colour"] == colour)


def stands(x: dict, y: dict, rel: str) -> bool:
    """Plain meaning: x's centre is left of / right of / above / below y's."""
    (xx, xy), (yx, yy) = (((o["x0"] + o["x1"]) / 2, (o["y0"] + o["y1"]) / 2) for o in (x, y))
    return {"to the left of": xx < yx, "to the right of": xx > yx, "above": xy < yy, "below": xy > yy}[rel]


def true_of(text: str, objects: list[dict]) -> bool:
    for form in FORMS:
        m = form.match(text)
        if m is None:
            continue
        g = {k: (v.lower() if v else v) for k, v in m.groupdict().items()}
        xs = [o for o in objects if matches(o, g["ac"], g["as"])]
        if "bs" not in g:
            return bool(xs)
        ys = [o for o in objects if matches(o, g["bc"], g["bs"])]
        if "rel" not in g:
            return bool(xs) and bool(ys)
        return any(stands(x, y, g["rel"]) for x in xs for y in ys if x is not y)
    raise AssertionError(f"not a probe sentence: {text!r}")


def test_the_probe_is_sugarcrepes_format_and_every_caption_checks_out(tiny_world):
    folder = tiny_world / "sugarcrepe"
    truth = defaultdict(list)
    for row in pq.read_table(tiny_world / "ground_truth.parquet").to_pylist():
        truth[row["file"]].append(row)
    per_category = TINY_WORLD["probe"]["per_category"]
    for category in CATEGORIES:
        doc = json.loads((folder / f"{category}.json").read_text())
        assert list(doc) == [str(i) for i in range(per_category)]
        for item in doc.values():
            assert set(item) == {"filename", "caption", "negative_caption"}
            assert (folder / "images" / item["filename"]).is_file()
            objects = truth[f"sugarcrepe/images/{item['filename']}"]
            visible = [o for o in objects if o["visible"] >= 0.6]
            assert item["caption"] != item["negative_caption"]
            assert true_of(item["caption"], visible), (category, item)
            assert not true_of(item["negative_caption"], objects), (category, item)
    # Fresh images: named apart from every COCO id, and used by no other part of the world.
    names = {p.name for p in (folder / "images").iterdir()}
    world = json.loads((tiny_world / "world.json").read_text())
    assert world["probe"]["images"] == len(names) and all(700_000 <= int(n[:12]) < 800_000 for n in names)
    others = {p.name for p in tiny_world.rglob("*.jpg") if "sugarcrepe" not in p.parts}
    assert not names & others


def scene(*objs: tuple[str, str, tuple[int, int, int, int]]) -> Scene:
    objects = tuple(Obj(shape, colour, "small", box) for colour, shape, box in objs)
    return Scene(100, 100, "plain", objects, (1.0,) * len(objects))


def test_hand_made_scenes():
    rng = np.random.default_rng(0)
    s = scene(("red", "circle", (0, 40, 20, 60)), ("blue", "star", (70, 40, 90, 60)))
    assert probe_pair(s, "replace_rel", rng) in {
        ("A red circle to the left of a blue star.", "A red circle to the right of a blue star."),
        ("A blue star to the right of a red circle.", "A blue star to the left of a red circle."),
    }
    assert probe_pair(s, "swap_att", rng) in {
        ("A red circle and a blue star.", "A blue circle and a red star."),
    }
    pos, neg = probe_pair(s, "swap_obj", rng)
    assert (pos, neg) in {
        ("A circle to the left of a star.", "A star to the left of a circle."),
        ("A star to the right of a circle.", "A circle to the right of a star."),
    }
    # Side by side too closely: no relation is stated, so no relation item.
    close = scene(("red", "circle", (30, 40, 50, 60)), ("blue", "star", (35, 42, 55, 62)))
    assert probe_pair(close, "replace_rel", rng) is None and probe_pair(close, "swap_obj", rng) is None
    # Two objects of one shape: swap_obj needs shapes alone of their kind.
    twins = scene(("red", "circle", (0, 40, 20, 60)), ("blue", "circle", (70, 40, 90, 60)))
    assert probe_pair(twins, "swap_obj", rng) is None
    # A swap whose result is also in the image is no negative.
    both = scene(
        ("red", "circle", (0, 0, 20, 20)),
        ("blue", "star", (70, 0, 90, 20)),
        ("blue", "circle", (0, 70, 20, 90)),
        ("red", "star", (70, 70, 90, 90)),
    )
    for _ in range(20):
        pair = probe_pair(both, "swap_att", rng)
        assert pair is None or not true_of(pair[1], [_row(o) for o in both.objects])
    with pytest.raises(ValueError, match="unknown probe category"):
        probe_pair(s, "replace_colour", rng)


def _row(o: Obj) -> dict:
    x0, y0, x1, y1 = o.box
    return {"shape": o.shape, "colour": o.colour, "x0": x0, "y0": y0, "x1": x1, "y1": y1}
