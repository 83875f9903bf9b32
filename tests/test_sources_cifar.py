"""The CIFAR reader (pipeline/sources/cifar.py): CIFAR-10 and CIFAR-100 batches in their pickled
layout, malformed or unsafe pickles, and the demo world's batches read back."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo.world.formats import write_py2_pickle
from pipeline.sources import SourceError, read_cifar

from .helpers import TINY_WORLD

# --- CIFAR -----------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pattern_image(seed: int) -> np.ndarray:
    """A 32×32×3 image whose every pixel and channel differ, so a layout mistake shows."""
    y, x, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((y * 7 + x * 3 + c * 101 + seed * 13) % 256).astype(np.uint8)


def cifar_row(image: np.ndarray) -> np.ndarray:
    # As CIFAR documents it: 1024 red values, then 1024 green, then 1024 blue, each row-major.
    return np.concatenate([image[:, :, 0].ravel(), image[:, :, 1].ravel(), image[:, :, 2].ravel()])


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    for b in range(1, 6):
        write_py2_pickle(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [b, 9 - b],
                "data": np.stack([cifar_row(pattern_image(2 * b)), cifar_row(pattern_image(2 * b + 1))]),
                "filenames": [f"img_{2 * b}.png", f"img_{2 * b + 1}.png"],
            },
        )
    write_py2_pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [3, 0, 9],
            "data": np.stack([cifar_row(pattern_image(s)) for s in (100, 101, 102)]),
            "filenames": ["domestic_cat_s_000907.png", "aeroplane_s_000040.png", "trucking_rig_s_001247.png"],
        },
    )
    write_py2_pickle(
        folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    )
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    for name, labels in (("train", [2, 0]), ("test", [1])):
        write_py2_pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name} batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [0] * len(labels),
                "data": np.stack([cifar_row(pattern_image(50 + i)) for i in range(len(labels))]),
            },
        )
    write_py2_pickle(
        folder / "meta",
        {"fine_label_names": ["apple", "aquarium_fish", "maple_tree"], "coarse_label_names": ["fruit"]},
    )
    return folder


def test_read_cifar10(tmp_path):
    write_cifar10(tmp_path)
    names, images, labels = read_cifar(tmp_path, "cifar10", "train")
    assert names == CIFAR10_NAMES
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3) and images.flags.c_contiguous
    np.testing.assert_array_equal(images, np.stack([pattern_image(s) for s in range(2, 12)]))
    assert labels == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    names, images, labels = read_cifar(str(tmp_path / "cifar-10-batches-py"), "cifar10", "test")
    np.testing.assert_array_equal(images, np.stack([pattern_image(s) for s in (100, 101, 102)]))
    assert labels == [3, 0, 9]


def test_read_cifar100_fine_labels_and_spaced_names(tmp_path):
    write_cifar100(tmp_path)
    names, images, labels = read_cifar(tmp_path, "cifar100", "train")
    assert names == ["apple", "aquarium fish", "maple tree"]
    assert labels == [2, 0]
    np.testing.assert_array_equal(images, np.stack([pattern_image(50), pattern_image(51)]))
    assert read_cifar(tmp_path, "cifar100", "test")[2] == [1]


def test_read_cifar_accepts_str_keys(tmp_path):
    # A copy re-pickled under Python 3 has str keys, not Python 2's byte strings.
    folder = write_cifar100(tmp_path)
    data = np.stack([cifar_row(pattern_image(9))])
    with open(folder / "test", "wb") as f:
        pickle.dump({"fine_labels": [2], "data": data}, f, protocol=2)
    _, images, labels = read_cifar(tmp_path, "cifar100", "test")
    np.testing.assert_array_equal(images[0], pattern_image(9))
    assert labels == [2]


def _cifar_case(batch: dict) -> dict:
    return {"batch_label": "testing batch 1 of 1", **batch}


ROWS = np.stack([cifar_row(pattern_image(0)), cifar_row(pattern_image(1))])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"labels": [0, 1]}, "data: missing"),
        ({"data": ROWS}, "labels: missing"),
        (
            {"data": ROWS[:, :3000], "labels": [0, 1]},
            "data: expected a uint8 array of shape (N, 3072), got uint8 array of shape (2, 3000)",
        ),
        (
            {"data": ROWS.astype(np.int64), "labels": [0, 1]},
            "data: expected a uint8 array of shape (N, 3072), got int64 array of shape (2, 3072)",
        ),
        ({"data": [1, 2], "labels": [0, 1]}, "data: expected a uint8 array of shape (N, 3072), got list"),
        ({"data": ROWS, "labels": [0]}, "labels: expected a list of 2 labels, got 1 labels"),
        ({"data": ROWS, "labels": (0, 1)}, "labels: expected a list of 2 labels, got tuple"),
        ({"data": ROWS, "labels": [0, 10]}, "labels[1]: expected a class index below 10, got 10"),
        ({"data": ROWS, "labels": [-1, 0]}, "labels[0]: expected a class index below 10, got -1"),
    ],
)
def test_malformed_cifar_batch(tmp_path, batch, message):
    folder = write_cifar10(tmp_path)
    write_py2_pickle(folder / "test_batch", _cifar_case(batch))
    with pytest.raises(SourceError) as err:
        read_cifar(tmp_path, "cifar10", "test")
    assert str(err.value) == f"{folder / 'test_batch'}: {message}"


def test_malformed_cifar_files(tmp_path):
    folder = write_cifar10(tmp_path)
    meta = folder / "batches.meta"
    write_py2_pickle(meta, {"num_vis": 3072})
    with pytest.raises(SourceError) as err:
        read_cifar(tmp_path, "cifar10", "test")
    assert str(err.value) == f"{meta}: label_names: missing"
    write_py2_pickle(meta, {"label_names": "airplane"})
    with pytest.raises(SourceError, match=r"label_names: expected a list of strings, got bytes"):
        read_cifar(tmp_path, "cifar10", "test")
    write_py2_pickle(meta, [CIFAR10_NAMES])
    with pytest.raises(SourceError, match=r"batches\.meta: expected a dict, got list"):
        read_cifar(tmp_path, "cifar10", "test")
    meta.write_bytes(b"\x80\x02}q\x00(U")  # cut short
    with pytest.raises(SourceError, match=r"batches\.meta: not a CIFAR pickle: "):
        read_cifar(tmp_path, "cifar10", "test")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_may_not_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": _RunsCode()}, protocol=2))
    with pytest.raises(SourceError, match=r"not a CIFAR pickle: refusing to load global posix\.getcwd"):
        read_cifar(tmp_path, "cifar10", "test")


def test_read_cifar_unknown_set(tmp_path):
    with pytest.raises(ValueError, match="unknown CIFAR set"):
        read_cifar(tmp_path, "cifar10", "val")


# --- the demo world, read back with the reader -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "split", "n_classes", "per_class"),
    [
        ("cifar10", "train", 10, "cifar10_train_per_class"),
        ("cifar10", "test", 10, "cifar10_test_per_class"),
        ("cifar100", "train", 100, "cifar100_train_per_class"),
        ("cifar100", "test", 100, "cifar100_test_per_class"),
    ],
)
def test_demo_world_cifar(tiny_world, name, split, n_classes, per_class):
    per = TINY_WORLD["zeroshot"][per_class]
    classnames, images, labels = read_cifar(tiny_world, name, split)
    assert len(classnames) == n_classes and not any("_" in n for n in classnames)
    assert images.shape == (n_classes * per, 32, 32, 3) and images.dtype == np.uint8
    assert Counter(labels) == {k: per for k in range(n_classes)}
