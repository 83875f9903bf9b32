"""The evaluation sets: their names, and where curate puts each one (evaluate reads them there).

Every set lives in CLIP_benchmark's WebDataset layout, so that its `wds/` loader reads it as it is
(`build_dataset("wds/coco", root="data/curated/eval/coco", split="test")`):

    eval/sets.json                     the sets curate built and their splits: {"coco": ["val", "test"], …}
    eval/<set>/<split>/0.tar, 1.tar …  WebDataset shards, numbered as that loader expands them
    eval/<set>/<split>/nshards.txt     how many
    eval/<set>/<split>.parquet         the manifest (one row per image; per item for the probe)
    eval/<set>/dataset_type.txt        "retrieval" (coco, flickr30k): samples are an image and
                                       `txt`, every caption of the image, one per line
    eval/<set>/classnames.txt          zero-shot sets: samples are an image and `cls`, its label
    eval/<set>/zeroshot_classification_templates.txt   the paper's single prompt ("{c}": the class)

A set switched off in the params (its source null) is absent from sets.json and from the folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import InputError, MissingOutput

EVAL = "eval"  # under the curated folder
RETRIEVAL_SETS = ("coco", "flickr30k")  # Karpathy test: the readout
VAL_SUFFIX = "_val"
VAL_SETS = tuple(f"{name}{VAL_SUFFIX}" for name in RETRIEVAL_SETS)  # Karpathy val: where choices are made
ZEROSHOT_SETS = ("imagenet", "cifar10", "cifar100")
PROBE_SETS = ("sugarcrepe",)
DATASETS = VAL_SETS + RETRIEVAL_SETS + ZEROSHOT_SETS + PROBE_SETS
SINGLE_PROMPT = "This is a photo of a {}"  # the paper's prompt
SHARD_PATTERN = "{}.tar"  # CLIP_benchmark expands {0..n-1}.tar: no zero padding
NSHARDS = "nshards.txt"
DATASET_TYPE = "dataset_type.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
SETS = "sets.json"


def where(dataset: str) -> tuple[str, str]:
    """An evaluation data set's (set, split): coco → (coco, test), coco_val → (coco, val),
    imagenet → (imagenet, test)."""
    if dataset in VAL_SETS:
        return dataset.removesuffix(VAL_SUFFIX), "val"
    if dataset in DATASETS:
        return dataset, "test"
    raise InputError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")


def set_dir(curated: Path, name: str) -> Path:
    return curated / EVAL / name


def shard_dir(curated: Path, name: str, split: str) -> Path:
    return set_dir(curated, name) / split


def manifest(curated: Path, dataset: str) -> Path:
    name, split = where(dataset)
    return set_dir(curated, name) / f"{split}.parquet"


def shard_path(name: str, split: str, shard: str) -> str:
    """A shard's path relative to the curated folder, as manifests name it."""
    return f"{EVAL}/{name}/{split}/{shard}"


def write_shard_count(folder: Path, shards: list[Path]) -> None:
    """nshards.txt beside the shards; they must be 0.tar … n-1.tar, which is what it promises."""
    if [p.name for p in shards] != [SHARD_PATTERN.format(i) for i in range(len(shards))]:
        raise ValueError(f"{folder}: shards {shards} are not numbered 0 … {len(shards) - 1}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NSHARDS).write_text(f"{len(shards)}\n", encoding="utf-8")


def write_classnames(folder: Path, classnames: list[str]) -> None:
    """classnames.txt (one per line) and the paper's prompt as CLIP_benchmark's template file."""
    bad = [c for c in classnames if not c.strip() or "\n" in c or "\r" in c]
    if bad:
        raise InputError(f"{folder.name}: class names must be one non-empty line each: {bad[:3]!r}")
    (folder / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    (folder / TEMPLATES).write_text(SINGLE_PROMPT.format("{c}") + "\n", encoding="utf-8")


def read_classnames(curated: Path, name: str) -> list[str]:
    return (set_dir(curated, name) / CLASSNAMES).read_text(encoding="utf-8").splitlines()


def write_built(curated: Path, built: dict[str, list[str]]) -> None:
    """eval/sets.json: always written, so that the folder exists even with every set switched off."""
    folder = curated / EVAL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETS).write_text(json.dumps(built, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def check_built(curated: Path, datasets: Sequence[str]) -> None:
    """Every data set asked for was curated, or a MissingOutput names what is missing and why."""
    index = curated / EVAL / SETS
    if not index.is_file():
        raise MissingOutput(f"{index} not found; run the curate stage")
    built = json.loads(index.read_text(encoding="utf-8"))
    absent = [d for d in datasets if where(d)[1] not in built.get(where(d)[0], [])]
    if absent:
        raise MissingOutput(
            f"{index}: curate did not build {', '.join(absent)} (its source is switched off in the "
            "params' sources); leave it out of evaluate.datasets or switch the source on"
        )
