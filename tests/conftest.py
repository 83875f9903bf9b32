"""Shared fixtures. Tests never touch the network: hubs are switched off here, for the test process
and for every subprocess it starts. Constants and helper functions live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from .helpers import TINY_WORLD, Reproduced, make_pipeline_repo, sh

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="dclip-yolo-config-"))

# ultralytics' import sets OMP_NUM_THREADS=1 unless it is set: first through the project's guard,
# so that a test importing ultralytics does not change the threads (and the float rounding) of
# every stage the tests start afterwards.
from pipeline.runtime import import_ultralytics  # noqa: E402

import_ultralytics()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow on CPU: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_world_cfg():
    from pipeline.config import World

    return World.model_validate(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_world(tiny_world_cfg, tmp_path_factory) -> Path:
    """The tiny demo world, generated once per test session."""
    from pipeline.demo.world.generate import generate_world

    out = tmp_path_factory.mktemp("world") / "raw"
    generate_world(tiny_world_cfg, out, progress=False)
    return out


# --- a real DVC project on the tiny world --------------------------------------------------------


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Reproduced:
    """The tiny-world project after one whole `dvc repro`, its lock files committed. Shared by the
    end-to-end tests to keep the suite short: a test that edits it puts it back with `restore`."""
    root = make_pipeline_repo(tmp_path_factory.mktemp("clone"))
    first = sh(["dvc", "repro"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "reproduced"], root)
    return Reproduced(root, first)
