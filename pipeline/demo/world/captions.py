"""Captions of demo-world scenes: true statements of varied wording and detail.

Five kinds of caption — inventory with counts, spatial relation, counting, one object and its
place, colour summary — each phrased a few ways, then styled like the source they imitate
(COCO annotators, Flickr30k annotators, web alt-text). Relations name only objects that their
description picks out uniquely and whose relation is unambiguous, so that swapping the two makes a
false caption (the compositional probe relies on this).

The web domain (the demo CLIP's pretraining data) has captions of its own (`web_captions`): short,
partial, noisy alt-text — object names, often only some of the objects, rarely a size — and only
WEB_DESCRIPTIVE of them one of the five descriptive kinds above, so that every word the curated
captions use (relations, places, counts, backgrounds) is known to the text tower but seldom
grounded, as relations and counts are rare in web alt-text.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.demo.world.scene import Obj, Scene

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATION_MARGIN = 0.15  # centres this far apart (fraction of the image side) along the axis
LEFT_OF = ("left of", "to the left of", "on the left of")
RIGHT_OF = ("right of", "to the right of", "on the right of")
ABOVE = ("above", "over")
BELOW = ("below", "beneath", "under")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: Obj, b: Obj, scene: Scene) -> str | None:
    """'left', 'right', 'above' or 'below' when a stands clearly so of b, else None."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = (bx - ax) / scene.width, (by - ay) / scene.height
    if abs(dx) >= RELATION_MARGIN and abs(dx) > abs(dy):
        return "left" if dx > 0 else "right"
    if abs(dy) >= RELATION_MARGIN and abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return None


def referring_phrase(obj: Obj, scene: Scene) -> str | None:
    """The shortest description that picks out `obj` alone in the scene, if any does."""
    same = [o for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape)]
    if len(same) == 1:
        return f"{obj.colour} {obj.shape}"
    if sum(o.size == obj.size for o in same) == 1:
        return f"{obj.size} {obj.colour} {obj.shape}"
    return None


def position(obj: Obj, scene: Scene) -> str:
    cx, cy = obj.centre
    col = min(int(3 * cx / scene.width), 2)
    row = min(int(3 * cy / scene.height), 2)
    return [
        ["in the top left corner", "at the top", "in the top right corner"],
        ["on the left", "in the middle", "on the right"],
        ["in the bottom left corner", "at the bottom", "in the bottom right corner"],
    ][row][col]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# --- the kinds of caption: each returns a lower-case phrase, or None where it does not apply ----


def inventory(scene: Scene, rng: np.random.Generator) -> str:
    groups = Counter((o.colour, o.shape) for o in scene.objects)
    parts = []
    for (colour, shape), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        if n == 1:
            obj = next(o for o in scene.objects if (o.colour, o.shape) == (colour, shape))
            parts.append(with_article(f"{obj.size} {colour} {shape}"))
        else:
            parts.append(f"{NUMBERS[n]} {colour} {plural(shape)}")
    order = rng.permutation(len(parts))
    return join([parts[i] for i in order])


def spatial(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = []
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i == j:
                continue
            rel = relation(a, b, scene)
            pa, pb = referring_phrase(a, scene), referring_phrase(b, scene)
            if rel and pa and pb:
                pairs.append((pa, rel, pb))
    if not pairs:
        return None
    pa, rel, pb = _pick(rng, pairs)
    words = {"left": LEFT_OF, "right": RIGHT_OF, "above": ABOVE, "below": BELOW}[rel]
    return f"{with_article(pa)} {_pick(rng, words)} {with_article(pb)}"


def counting(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    if rng.random() < 0.5:
        noun = "shape" if n == 1 else "shapes"
        lead = with_article("shape") if n == 1 else f"{NUMBERS[n]} {noun}"
        return f"{lead} on {with_article(scene.background)} background"
    shapes = Counter(o.shape for o in scene.objects)
    parts = [
        with_article(s) if k == 1 else f"{NUMBERS[k]} {plural(s)}"
        for s, k in sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return join(parts)


def focus(scene: Scene, rng: np.random.Generator) -> str:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return f"{with_article(f'{obj.size} {obj.colour} {obj.shape}')} {position(obj, scene)}"


def colours(scene: Scene, rng: np.random.Generator) -> str:
    groups = Counter(o.colour for o in scene.objects)
    parts = [
        with_article(f"{c} object") if k == 1 else f"{NUMBERS[k]} {c} objects"
        for c, k in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return f"{join(parts)} on {with_article(scene.background)} background"


KINDS = (inventory, spatial, counting, focus, colours)
OPENERS = ("", "", "a picture of ", "an image of ", "a drawing of ", "a view of ")


def describe(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct true phrases about the scene, spread over the kinds of caption."""
    out: list[str] = []
    kinds = list(KINDS)
    for attempt in range(20 * n):
        kind = kinds[attempt % len(kinds)] if attempt < len(kinds) else _pick(rng, kinds)
        phrase = kind(scene, rng)
        if phrase is None:
            continue
        if attempt >= len(kinds):
            phrase = _pick(rng, OPENERS) + phrase
        if phrase not in out:
            out.append(phrase)
        if len(out) == n:
            break
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# --- source styles ---------------------------------------------------------------------------


def coco_style(phrase: str, rng: np.random.Generator) -> str:
    text = phrase[0].upper() + phrase[1:] if rng.random() < 0.85 else phrase
    return text + ("." if rng.random() < 0.6 else "")


def flickr_style(phrase: str, rng: np.random.Generator) -> str:
    if phrase.startswith(("a ", "an ", "one ", "two ", "three ", "four ")) and rng.random() < 0.5:
        phrase = phrase + _pick(rng, (" is shown", " can be seen", " appears in the picture"))
    return phrase[0].upper() + phrase[1:] + "."


def alt_text_style(phrase: str, rng: np.random.Generator) -> str:
    for lead in ("a picture of ", "an image of ", "a drawing of ", "a view of "):
        phrase = phrase.removeprefix(lead)
    lead = _pick(rng, ("", "", "stock image of ", "illustration of ", "vector graphic : "))
    tail = _pick(rng, ("", "", " - stock photo", " | clipart"))
    return lead + phrase + tail


STYLES = {"coco": coco_style, "flickr": flickr_style, "alt_text": alt_text_style}


def captions(scene: Scene, rng: np.random.Generator, n: int, style: str) -> list[str]:
    if style == "web":
        return web_captions(scene, rng, n)
    styler = STYLES[style]
    return [styler(p, rng) for p in describe(scene, rng, n)]


# --- the web domain's alt-text ---------------------------------------------------------------

WEB_DESCRIPTIVE = 0.12  # share of web captions that are one of the descriptive kinds above
WEB_LEADS = ("", "", "", "stock image of ", "illustration of ", "vector graphic : ", "free ", "png ")
WEB_TAILS = ("", "", "", " - stock photo", " | clipart", " icon", " hd wallpaper", " vector", " #shapes")
# Now and then a caption reads like an annotator's (Flickr30k's phrasing), so that its words are
# known too.
WEB_SENTENCE_TAILS = (" is shown", " can be seen", " appears in the picture")


def _names(scene: Scene, rng: np.random.Generator) -> str:
    """Colour-shape names of some of the objects (each kept with probability 0.7, at least one),
    without sizes, counts or places: "red star and blue circle"."""
    objs = list(scene.objects)
    kept = [o for o in objs if rng.random() < 0.7] or [objs[int(rng.integers(len(objs)))]]
    parts = list(dict.fromkeys(f"{o.colour} {o.shape}" for o in kept))
    order = rng.permutation(len(parts))
    words = [parts[i] for i in order]
    if rng.random() < 0.5:
        words = [with_article(w) for w in words]
    return join(words) if rng.random() < 0.6 else ", ".join(words)


def _partial(scene: Scene, rng: np.random.Generator) -> str:
    """One object, partly named: its shape alone, its shape with its size, or a plural tag."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    return _pick(rng, (o.shape, with_article(o.shape), f"{o.size} {o.colour} {o.shape}", plural(o.shape)))


def web_phrase(scene: Scene, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < WEB_DESCRIPTIVE:
        for _ in range(len(KINDS)):
            phrase = _pick(rng, KINDS)(scene, rng)
            if phrase is not None:
                return phrase
    return _names(scene, rng) if u < 0.75 else _partial(scene, rng)


def web_style(phrase: str, rng: np.random.Generator) -> str:
    tail = _pick(rng, WEB_SENTENCE_TAILS) if rng.random() < 0.05 else _pick(rng, WEB_TAILS)
    text = _pick(rng, WEB_LEADS) + phrase + tail
    u = rng.random()
    if u < 0.2:
        return text.title()
    if u < 0.3:
        return text.upper()
    return text


def web_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct alt-text captions (fewer when the scene allows no more)."""
    out: list[str] = []
    for _ in range(20 * n):
        text = web_style(web_phrase(scene, rng), rng)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out
