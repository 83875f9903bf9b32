"""The demo world's zero-shot sets: ImageNet's validation folders and CIFAR-10/100's pickles, with
one class per (colour, shape), drawn in the web domain (as ImageNet is to web data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import World
from pipeline.demo.world import formats
from pipeline.demo.world.captions import plural
from pipeline.demo.world.paint import (
    CIFAR10_TEST,
    CIFAR10_TRAIN,
    CIFAR100_TEST,
    CIFAR100_TRAIN,
    ID_STREAM,
    IMAGENET,
    GroundTruth,
    Job,
    Painter,
)
from pipeline.demo.world.scene import COLOURS, SHAPES, WARM_COLOURS

CIFAR_SIZE = 32
COLOUR_SHAPE_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def imagenet_wnid(class_index: int) -> str:
    return f"n{90_000_000 + class_index}"


def write_imagenet(cfg: World, root: Path, painter: Painter, truth: GroundTruth) -> dict:
    per = cfg.zeroshot.imagenet_per_class
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    # Drawn like the pretraining data (as ImageNet is to web data): zero-shot retention then
    # measures what fine-tuning on the curated domain forgets.
    jobs = [
        Job(IMAGENET, k * per + j, single=cls, domain="web")
        for k, cls in enumerate(classes)
        for j in range(per)
    ]
    # Real validation files are numbered in an order unrelated to their class.
    numbers = np.random.default_rng([cfg.seed, IMAGENET, 0, ID_STREAM]).permutation(len(jobs)) + 1
    base = root / "imagenet"
    for k in range(len(COLOUR_SHAPE_CLASSES)):
        (base / "val" / imagenet_wnid(k)).mkdir(parents=True, exist_ok=True)
    for j, sample in enumerate(painter.paint(jobs, "imagenet")):
        rel = f"imagenet/val/{imagenet_wnid(j // per)}/ILSVRC2012_val_{int(numbers[j]):08d}.JPEG"
        (root / rel).write_bytes(sample.jpeg)
        truth.add(rel, sample.scene)
    (base / "LOC_synset_mapping.txt").write_text(
        "".join(f"{imagenet_wnid(k)} {name}\n" for k, name in enumerate(COLOUR_SHAPE_CLASSES))
    )
    return {"classes": len(classes), "images": len(jobs)}


def _cifar_images(
    painter: Painter, source: int, classes: list[tuple[str, str]], desc: str
) -> list[np.ndarray]:
    """One 32×32 image per (colour, shape)."""
    jobs = [
        Job(source, i, single=cls, size=(CIFAR_SIZE, CIFAR_SIZE), raw=True, domain="web")
        for i, cls in enumerate(classes)
    ]
    return [s.pixels for s in painter.paint(jobs, desc)]


def _colour_shape(fine_name: str) -> tuple[str, str]:
    colour, shape = fine_name.split("_")
    return colour, shape


def _balanced_labels(seed: int, source: int, n_classes: int, per_class: int) -> list[int]:
    labels = np.repeat(np.arange(n_classes), per_class)
    return [int(v) for v in np.random.default_rng([seed, source, 0, ID_STREAM]).permutation(labels)]


def write_cifar(cfg: World, root: Path, painter: Painter) -> dict:
    z = cfg.zeroshot
    colours = list(COLOURS)
    # CIFAR-10: the ten shapes, each image in a colour of its own.
    c10 = root / "cifar-10-batches-py"

    def any_colour(source: int, labels: list[int]) -> list[tuple[str, str]]:
        picks = np.random.default_rng([cfg.seed, source, 0, ID_STREAM + 1]).integers(
            len(colours), size=len(labels)
        )
        return [(colours[int(p)], SHAPES[lab]) for p, lab in zip(picks, labels)]

    names10 = list(SHAPES)
    train_labels = _balanced_labels(cfg.seed, CIFAR10_TRAIN, 10, z.cifar10_train_per_class)
    test_labels = _balanced_labels(cfg.seed, CIFAR10_TEST, 10, z.cifar10_test_per_class)
    train = _cifar_images(painter, CIFAR10_TRAIN, any_colour(CIFAR10_TRAIN, train_labels), "cifar10 train")
    test = _cifar_images(painter, CIFAR10_TEST, any_colour(CIFAR10_TEST, test_labels), "cifar10 test")
    batches = np.array_split(np.arange(len(train)), 5)
    for b, idx in enumerate(batches, start=1):
        formats.write_py2_pickle(
            c10 / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [train_labels[i] for i in idx],
                "data": formats.cifar_rows([train[i] for i in idx]),
                "filenames": [f"{names10[train_labels[i]]}_s_{i:06d}.png" for i in idx],
            },
        )
    formats.write_py2_pickle(
        c10 / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels,
            "data": formats.cifar_rows(test),
            "filenames": [f"{names10[lab]}_s_{i:06d}.png" for i, lab in enumerate(test_labels)],
        },
    )
    formats.write_py2_pickle(
        c10 / "batches.meta",
        {"num_cases_per_batch": len(batches[0]), "label_names": names10, "num_vis": 3072},
    )

    # CIFAR-100: fine classes are colour_shape (alphabetical, as CIFAR-100's are); coarse classes
    # group each shape's warm and cool colours.
    fine = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
    coarse = sorted(
        {f"{'warm' if c in WARM_COLOURS else 'cool'}_{plural(s)}" for c in COLOURS for s in SHAPES}
    )

    def coarse_of(label: int) -> int:
        c, s = fine[label].split("_")
        return coarse.index(f"{'warm' if c in WARM_COLOURS else 'cool'}_{plural(s)}")

    c100 = root / "cifar-100-python"
    for name, source, per in (
        ("train", CIFAR100_TRAIN, z.cifar100_train_per_class),
        ("test", CIFAR100_TEST, z.cifar100_test_per_class),
    ):
        labels = _balanced_labels(cfg.seed, source, 100, per)
        images = _cifar_images(
            painter, source, [_colour_shape(fine[lab]) for lab in labels], f"cifar100 {name}"
        )
        formats.write_py2_pickle(
            c100 / name,
            {
                "filenames": [f"{fine[lab]}_s_{i:06d}.png" for i, lab in enumerate(labels)],
                "batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [coarse_of(lab) for lab in labels],
                "data": formats.cifar_rows(images),
            },
        )
    formats.write_py2_pickle(c100 / "meta", {"fine_label_names": fine, "coarse_label_names": coarse})
    return {
        "cifar10": {"classes": 10, "train": len(train), "test": len(test)},
        "cifar100": {
            "classes": 100,
            "coarse_classes": len(coarse),
            "train": 100 * z.cifar100_train_per_class,
            "test": 100 * z.cifar100_test_per_class,
        },
    }
