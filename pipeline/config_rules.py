"""Rules across params sections, checked when a params file is read (`dclip params check` and
every stage), so that a combination that cannot work fails before hours are spent, not in the
stage that meets it.

Each rule compares only sections the file sets: a stage that validates a few sections leaves the
others at their defaults, which must not be mistaken for the file's.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from pipeline.config import Params

# Where each stage writes (section, key): no two may be the same path or one inside the other.
OUTPUTS = (
    ("world", "out"),
    ("clip", "checkpoint"),
    ("detector", "checkpoint"),
    ("curate", "out"),
    ("detect", "out"),
    ("embed", "out"),
    ("teacher", "out"),
    ("teacher", "targets"),
    ("distill", "out"),
    ("export", "out"),
    ("runtime", "scratch"),  # every resuming stage's parts, a folder each under it
)
# The demo world writes the raw sources: they are meant to lie inside world.out.
WRITES_SOURCES = ("world", "out")


def problems(params: Params) -> list[str]:
    """Every cross-section rule the params break, one line each (empty when none)."""
    given = params.model_fields_set
    return [
        *_image_size(params, given),
        *_heads(params, given),
        *_overlaps(params, given),
        *_inside_root(params, given),
        *_switched_off(params, given),
    ]


def _image_size(params: Params, given: set[str]) -> list[str]:
    """Curated images must not be smaller than the model's input: CLIP's preprocessing would
    upscale every stored image and detect would see less than it should."""
    if not {"clip", "curate"} <= given:
        return []
    need = model_input_size(params.clip.model)
    if need is None or params.curate.image_size >= need:
        return []
    return [
        f"curate.image_size: {params.curate.image_size} is smaller than the input of clip.model "
        f"{params.clip.model} ({need} px); store images at least that large"
    ]


def _heads(params: Params, given: set[str]) -> list[str]:
    """The teacher's attention heads split CLIP's joint space: a count that does not divide its
    width would fail only at the teacher stage, hours in."""
    if not {"clip", "teacher"} <= given:
        return []
    width = _model_config(params.clip.model).get("embed_dim")
    if width is None or int(width) % params.teacher.heads == 0:
        return []
    return [
        f"teacher.heads: {params.teacher.heads} does not divide the embedding width of clip.model "
        f"{params.clip.model} ({width})"
    ]


def _model_config(model: str) -> dict:
    from pipeline.models.clip import architecture  # imported when a rule needs it: open_clip is slow

    return architecture(model)


def model_input_size(model: str) -> int | None:
    """The image side an open_clip architecture takes, from its config alone (no weights)."""
    size: Any = _model_config(model).get("vision_cfg", {}).get("image_size")
    if isinstance(size, list | tuple):
        return int(max(size))
    return int(size) if size is not None else None


def _paths(params: Params, given: set[str]) -> tuple[dict[str, PurePosixPath], dict[str, PurePosixPath]]:
    outputs = {
        f"{section}.{key}": PurePosixPath(getattr(getattr(params, section), key))
        for section, key in OUTPUTS
        if section in given
    }
    inputs: dict[str, PurePosixPath] = {}
    if "sources" in given:
        inputs["sources.root"] = PurePosixPath(params.sources.root)
        for name, source in params.sources:
            if not isinstance(source, BaseModel):  # sources.root, or a source switched off
                continue
            for key, value in source:
                # sources.karpathy names its files inside its folder: the folder is the input.
                if isinstance(value, str) and (name != "karpathy" or key == "folder"):
                    inputs[f"sources.{name}.{key}"] = PurePosixPath(value)
    return outputs, inputs


def _within(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or b in a.parents


def _overlaps(params: Params, given: set[str]) -> list[str]:
    """No stage may write where another writes or where the raw sources are: DVC would track one
    output inside another, and a stage could delete what another made."""
    outputs, inputs = _paths(params, given)
    found = []
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = outputs[a], outputs[b]
            if _within(pa, pb) or _within(pb, pa):
                found.append(f"{a}: {pa} and {b}: {pb} overlap; give each stage output its own path")
    world = ".".join(WRITES_SOURCES)
    for out, po in outputs.items():
        if out == world:
            continue
        for src, ps in inputs.items():
            if _within(po, ps) or _within(ps, po):
                found.append(f"{out}: {po} overlaps the raw input {src}: {ps}; write outputs elsewhere")
    return found


def _inside_root(params: Params, given: set[str]) -> list[str]:
    """Every source lies inside sources.root: the curate stage depends on that folder alone, so a
    source outside it could change without DVC re-running curate."""
    if "sources" not in given:
        return []
    _, inputs = _paths(params, given)
    root = PurePosixPath(params.sources.root)
    return [
        f"{key}: {path} lies outside sources.root: {root}; the curate stage depends on that folder "
        "alone (move or link the data inside it, or set sources.root to a folder that holds every source)"
        for key, path in inputs.items()
        if not _within(path, root)
    ]


# The evaluation sets each source builds (pipeline/evalsets.py names them).
SETS_OF = {
    "coco": ("coco_val", "coco"),
    "flickr30k": ("flickr30k_val", "flickr30k"),
    "imagenet": ("imagenet",),
    "cifar10": ("cifar10",),
    "cifar100": ("cifar100",),
    "sugarcrepe": ("sugarcrepe",),
}


def _switched_off(params: Params, given: set[str]) -> list[str]:
    """A source switched off (null) is asked for by nothing: no training pairs (curate.mix), no
    evaluation set (evaluate.datasets); and what an enabled source needs is there."""
    if "sources" not in given:
        return []
    src = params.sources
    found = []
    if "curate" in given:
        for name, asked in params.curate.mix:
            if asked > 0 and getattr(src, name) is None:
                found.append(
                    f"curate.mix.{name}: {asked} pairs asked of sources.{name}, which is null (switched "
                    f"off); set curate.mix.{name}: 0, or give sources.{name}"
                )
        if params.curate.mix.coco > 0 and src.coco is not None and src.coco.train_annotations is None:
            found.append(
                f"curate.mix.coco: {params.curate.mix.coco} pairs asked, but sources.coco.train_annotations "
                "is null; give COCO's captions_train2017.json, or set curate.mix.coco: 0"
            )
    for name in ("coco", "flickr30k"):
        if getattr(src, name) is None:
            continue
        if src.karpathy is None or getattr(src.karpathy, name) is None:
            key = "sources.karpathy" if src.karpathy is None else f"sources.karpathy.{name}"
            found.append(
                f"{key} is null, but sources.{name} is on: Karpathy's split file says which of its "
                f"images are held out (val, test); give it, or set sources.{name}: null"
            )
    if "evaluate" in given:
        off = {s: name for name, sets in SETS_OF.items() if getattr(src, name) is None for s in sets}
        for dataset in params.evaluate.datasets:
            if dataset in off:
                source = f"sources.{off[dataset]}"
                found.append(
                    f"evaluate.datasets: {dataset} is built from {source}, which is null (switched "
                    f"off); leave {dataset} out of evaluate.datasets, or give {source}"
                )
    return found
