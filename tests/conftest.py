"""Shared fixtures. Tests never touch the network: hubs are switched off here, for the test process
and for every subprocess it starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="dclip-yolo-config-"))

REPO = Path(__file__).resolve().parents[1]

# A world small enough for a test, with every part present (incl. planted duplicates, failures).
TINY_WORLD = {
    "seed": 7,
    "image_size": [96, 128],
    "coco": {"train2014": 40, "val2014": 30, "val2017": 8, "karpathy_val": 5, "karpathy_test": 15},
    "flickr30k": {"train": 20, "val": 5, "test": 10},
    "cc": {"samples": 30, "shard_size": 12, "failed": 3, "corrupt": 1},
    "zeroshot": {
        "imagenet_per_class": 1,
        "cifar10_train_per_class": 1,
        "cifar10_test_per_class": 2,
        "cifar100_train_per_class": 1,
        "cifar100_test_per_class": 1,
    },
    "probe": {"images": 30, "per_category": 4},
    "planted_duplicates": 2,
    "workers": 2,
}


@pytest.fixture(scope="session")
def tiny_world_cfg():
    from pipeline.config import World

    return World.model_validate(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_world(tiny_world_cfg, tmp_path_factory) -> Path:
    """The tiny demo world, generated once per test session."""
    from pipeline.world.generate import generate_world

    out = tmp_path_factory.mktemp("world") / "raw"
    generate_world(tiny_world_cfg, out, progress=False)
    return out
