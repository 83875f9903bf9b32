"""Scenes and captions of the demo world: boxes are tight, overlap is bounded, captions are true."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.demo.world import captions as cap
from pipeline.demo.world.scene import (
    COLOURS,
    SHAPES,
    Layout,
    Obj,
    Scene,
    _acceptable_overlap,
    render,
    sample_layout,
    shape_mask,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_fills_its_square_along_one_side(shape):
    mask = np.asarray(shape_mask(shape, 64)) > 127
    rows, cols = np.nonzero(mask)
    assert mask.sum() > 0.25 * 64 * 64
    spans = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert max(spans) >= 63


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_box_is_tight_around_the_visible_pixels(shape):
    bg = (220, 220, 220)
    layout = Layout(120, 100, "plain", bg, ((shape, "blue", "large", COLOURS["blue"], 30, 20, 40),))
    image, scene = render(layout, np.random.default_rng(0))
    diff = np.abs(np.asarray(image, dtype=int) - np.array(bg)).sum(axis=2) > 30
    rows, cols = np.nonzero(diff)
    x0, y0, x1, y1 = scene.objects[0].box
    assert abs(x0 - cols.min()) <= 1 and abs(x1 - (cols.max() + 1)) <= 1
    assert abs(y0 - rows.min()) <= 1 and abs(y1 - (rows.max() + 1)) <= 1
    assert scene.visible == (1.0,)


def test_visibility_counts_pixels_hidden_by_later_objects():
    items = (
        ("square", "red", "large", COLOURS["red"], 0, 0, 20),
        ("square", "blue", "large", COLOURS["blue"], 10, 0, 20),
    )
    _, scene = render(Layout(40, 30, "plain", (220, 220, 220), items), np.random.default_rng(0))
    assert scene.visible == (0.5, 1.0)
    assert [o.box for o in scene.objects] == [(0, 0, 20, 20), (10, 0, 30, 20)]


@settings(max_examples=60, deadline=None)
@given(seed=seeds, n=st.integers(1, 4))
def test_layouts_stay_inside_the_image_and_overlap_little(seed, n):
    layout = sample_layout(np.random.default_rng(seed), 150, 120, n)
    assert 1 <= len(layout.items) <= n
    boxes = []
    for _shape, _colour, _size, _rgb, x, y, side in layout.items:
        assert 0 <= x and x + side <= 150 and 0 <= y and y + side <= 120
        boxes.append((x, y, x + side, y + side))
    for i in range(len(boxes)):
        for j in range(i):
            assert _acceptable_overlap(boxes[i], boxes[j])


def test_overlap_rule_exact_values():
    assert _acceptable_overlap((0, 0, 10, 10), (10, 0, 20, 10))  # touching
    assert _acceptable_overlap((0, 0, 10, 10), (8, 0, 18, 10))  # IoU 20/180
    assert not _acceptable_overlap((0, 0, 10, 10), (5, 0, 15, 10))  # IoU 50/150 = 1/3
    assert not _acceptable_overlap((0, 0, 40, 40), (5, 5, 15, 15))  # small box inside large


def scene_of(*objs: tuple[str, str, str, tuple[int, int, int, int]], w=100, h=100) -> Scene:
    objects = tuple(Obj(s, c, z, b) for s, c, z, b in objs)
    return Scene(w, h, "striped", objects, tuple(1.0 for _ in objects))


def test_relation_needs_a_clear_margin_along_the_main_axis():
    a = Obj("circle", "red", "small", (0, 40, 20, 60))
    b = Obj("square", "blue", "small", (60, 45, 80, 65))
    c = Obj("star", "green", "small", (10, 45, 30, 65))
    s = scene_of()
    assert cap.relation(a, b, s) == "left" and cap.relation(b, a, s) == "right"
    assert cap.relation(a, c, s) is None  # 10 px apart: too close to call
    d = Obj("ring", "black", "small", (5, 0, 25, 20))
    assert cap.relation(d, a, s) == "above" and cap.relation(a, d, s) == "below"


def test_referring_phrase_uses_size_only_when_needed():
    s = scene_of(
        ("circle", "red", "small", (0, 0, 10, 10)),
        ("circle", "red", "large", (50, 50, 90, 90)),
        ("star", "blue", "small", (0, 50, 10, 60)),
        ("star", "blue", "small", (50, 0, 60, 10)),
    )
    a, b, c, _ = s.objects
    assert cap.referring_phrase(a, s) == "small red circle"
    assert cap.referring_phrase(b, s) == "large red circle"
    assert cap.referring_phrase(c, s) is None  # two identical small blue stars


def test_inventory_and_counting_exact():
    s = scene_of(
        ("circle", "red", "small", (0, 0, 10, 10)),
        ("circle", "red", "large", (50, 50, 90, 90)),
        ("cross", "blue", "small", (0, 50, 10, 60)),
    )
    rng = np.random.default_rng(0)
    assert sorted(cap.inventory(s, rng).replace(" and ", ", ").split(", ")) == [
        "a small blue cross",
        "two red circles",
    ]
    assert cap.plural("cross") == "crosses" and cap.article("orange") == "an"
    assert cap.join(["a", "b", "c"]) == "a, b and c"


REL = re.compile(
    r"^(?:an? )(?P<a>[a-z ]+?) (?P<rel>left of|to the left of|on the left of|right of|to the right of"
    r"|on the right of|above|over|below|beneath|under) (?:an? )(?P<b>[a-z ]+)$"
)
REL_KIND = {"left of": "left", "to the left of": "left", "on the left of": "left", "right of": "right",
            "to the right of": "right", "on the right of": "right", "above": "above", "over": "above",
            "below": "below", "beneath": "below", "under": "below"}  # fmt: skip


def find(scene: Scene, phrase: str) -> Obj:
    matches = [
        o for o in scene.objects if phrase in (f"{o.colour} {o.shape}", f"{o.size} {o.colour} {o.shape}")
    ]
    assert len(matches) == 1, (phrase, scene)
    return matches[0]


@settings(max_examples=80, deadline=None)
@given(seed=seeds)
def test_spatial_captions_are_true_and_false_when_swapped(seed):
    rng = np.random.default_rng(seed)
    _, scene = render(sample_layout(rng, 160, 128, 4), rng)
    phrase = cap.spatial(scene, rng)
    if phrase is None:
        return
    m = REL.match(phrase)
    assert m, phrase
    a, b = find(scene, m["a"]), find(scene, m["b"])
    assert cap.relation(a, b, scene) == REL_KIND[m["rel"]]
    # The swapped caption (the probe's hard negative) is false.
    assert cap.relation(b, a, scene) != REL_KIND[m["rel"]]


@settings(max_examples=80, deadline=None)
@given(seed=seeds, style=st.sampled_from(sorted(cap.STYLES)))
def test_captions_are_distinct_and_counts_are_right(seed, style):
    rng = np.random.default_rng(seed)
    _, scene = render(sample_layout(rng, 160, 128, 4), rng)
    texts = cap.captions(scene, rng, 5, style)
    assert len(texts) == len(set(texts)) == 5
    phrase = cap.inventory(scene, rng)
    counted = Counter()
    for part in phrase.replace(" and ", ", ").split(", "):
        words = part.split()
        k = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}[words[0]]
        shape = words[-1] if k == 1 else next(s for s in SHAPES if cap.plural(s) == words[-1])
        counted[(words[-2], shape)] += k
    truth = Counter((o.colour, o.shape) for o in scene.objects)
    assert counted == truth


# --- the web domain (the demo CLIP's pretraining data and the zero-shot sets) ------------------------


def test_web_layouts_are_bigger_and_draw_their_own_backgrounds():
    from pipeline.demo.world.scene import BACKGROUNDS, SIZES, WEB_BACKGROUNDS, WEB_SIZES

    curated = [sample_layout(np.random.default_rng(i), 160, 128, 1) for i in range(300)]
    web = [sample_layout(np.random.default_rng(i), 160, 128, 1, domain="web") for i in range(300)]
    side = lambda layouts: np.mean([lay.items[0][-1] / 128 for lay in layouts])  # noqa: E731
    assert side(web) > 1.4 * side(curated)
    assert all(lay.items[0][-1] / 128 <= SIZES["large"][1] + 0.01 for lay in curated)
    assert max(lay.items[0][-1] / 128 for lay in web) > WEB_SIZES["large"][0]
    assert {lay.background for lay in curated} == set(BACKGROUNDS)
    web_bg = Counter(lay.background for lay in web)
    assert set(web_bg) == set(WEB_BACKGROUNDS) | set(BACKGROUNDS)
    assert sum(web_bg[b] for b in WEB_BACKGROUNDS) / 300 > 0.8  # textured only now and then
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        sample_layout(np.random.default_rng(0), 160, 128, 1, domain="nope")


def test_the_curated_domain_draws_what_it_drew_before_the_web_domain_existed():
    # The curated layouts consume the generator exactly as before: the same seed, the same scene.
    rng = np.random.default_rng(5)
    layout = sample_layout(rng, 160, 128, 3)
    assert layout == sample_layout(np.random.default_rng(5), 160, 128, 3, domain="curated")
    # Read off the code before the web domain was added (git show <that commit>:pipeline/world/scene.py).
    assert layout.background == "striped"
    assert layout.items == (
        ("ring", "brown", "large", (132, 61, 30), 72, 23, 46),
        ("diamond", "blue", "small", (47, 79, 218), 56, 15, 22),
        ("heart", "yellow", "small", (247, 219, 20), 23, 89, 29),
    )


@pytest.mark.parametrize("background", ["gradient", "blotchy"])
def test_web_backgrounds_render_light_and_varied(background):
    lay = Layout(96, 64, background, (210, 210, 210), ())
    image, _ = render(lay, np.random.default_rng(0))
    px = np.asarray(image, dtype=np.float32)
    assert px.min() > 120  # light: no blotch passes for an object's colour
    assert px.std() > 2  # not plain


@settings(max_examples=60, deadline=None)
@given(seed=seeds)
def test_web_captions_are_distinct_short_and_name_only_what_is_there(seed):
    rng = np.random.default_rng(seed)
    _, scene = render(sample_layout(rng, 160, 128, 3, domain="web"), rng)
    texts = cap.captions(scene, rng, 5, "web")
    assert len(texts) == len(set(texts)) >= 1
    named = {w for o in scene.objects for w in (o.colour, o.shape, cap.plural(o.shape))}
    for text in texts:
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert words & set(COLOURS) <= {o.colour for o in scene.objects}
        assert words & (set(SHAPES) | {cap.plural(s) for s in SHAPES}) <= named


def test_web_captions_know_every_word_of_the_curated_captions_but_seldom_describe():
    from pipeline.demo.world.paint import WEB, Job, make_sample

    rng = np.random.default_rng(0)
    web_words, curated_words, descriptive, n = Counter(), Counter(), 0, 0
    # The pretraining split's own draws (its first 3,000 of 20,000 images), as the demo CLIP saw them.
    for i in range(3000):
        for text in make_sample(Job(WEB, i, WEB, i, "web", 5, domain="web"), 0, (128, 176), 4).captions:
            words = re.findall(r"[a-z]+", text.lower())
            web_words.update(words)
            descriptive += any(w in words for w in ("left", "right", "above", "below", "background"))
            n += 1
    for _ in range(600):
        _, scene = render(sample_layout(rng, 160, 128, 4), rng)
        for style in ("coco", "flickr"):
            for text in cap.captions(scene, rng, 5, style):
                curated_words.update(re.findall(r"[a-z]+", text.lower()))
    assert set(curated_words) - set(web_words) == set()
    assert descriptive / n < 2 * cap.WEB_DESCRIPTIVE
