"""Constants and helper functions shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

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
}


# --- small files in the raw formats ------------------------------------------------------------

# Hand-written annotation files in each format's real schema, read by the source readers' tests.
FIXTURES = Path(__file__).parent / "fixtures" / "sources"

# Two captions of COCO image 391895, as the fixtures hold them (the first with its trailing space).
MAN_ON_MOPED = (
    "A man with a red helmet on a small moped on a dirt road. ",
    "Man riding a motor bike on a dirt road on the countryside.",
)


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- a real DVC project on the tiny world --------------------------------------------------------

# What a clone carries that the pipeline needs: its definition and the code its stages depend on.
PROJECT_FILES = [
    ".gitignore",
    "dvc.yaml",
    "demo/dvc.yaml",
    "demo/weights",
    ".dvcignore",
    "pipeline",
    "stages",
    "metrics/ablations.json",  # the study's table, which the report page shows
]
# The stages of dvc.yaml, the study's DAG (the demo world is demo/dvc.yaml's).
STUDY_STAGES = {
    "weights",
    "curate",
    "detect",
    "embed",
    "train_teacher",
    "distill",
    "evaluate@base",
    "evaluate@student",
    "report",
    "export",
}
# Small enough for the tiny world: each source fills its count. Pairs: every caption of an image
# (params.yaml's captions_per_image: all), so 4 COCO and 2 Flickr30k images of 5 captions, 6 CC
# images of one.
CURATE_MIX = {"coco": 20, "flickr30k": 10, "cc": 6}


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run a command with this environment's tools first on PATH; fail the test on a non-zero exit."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_pipeline_repo(root: Path) -> Path:
    """A fresh git + DVC repository holding the project's pipeline, with params for the tiny world
    and a few quick epochs (the tests are about the wiring, not the numbers), committed."""
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"] = {**TINY_WORLD, "out": params["world"]["out"]}
    params["curate"].update(mix=CURATE_MIX, shard_size=8)
    params["teacher"].update(epochs=2, use_epoch=1, batch_size=8, heads=4, val_fraction=0.3, warmup_steps=1)
    params["distill"].update(epochs=1, batch_size=8, warmup_steps=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@dclip.invalid"], root)
    sh(["git", "config", "user.name", "dclip tests"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "pipeline"], root)
    return root


@dataclass
class Reproduced:
    root: Path
    first: str  # what the first `dvc repro` printed


# Stages whose outputs are metrics kept in git (cache: false): DVC's run-cache cannot bring them
# back, so they run again (seconds on the tiny world).
UNCACHED_STAGES = {"evaluate@base", "evaluate@student", "report"}


def restore(root: Path) -> None:
    """Back to the committed params; DVC's run-cache brings back the cached outputs without
    running their stages."""
    sh(["git", "checkout", "--", "params.yaml"], root)
    out = sh(["dvc", "repro"], root)
    assert set(re.findall(r"Running stage '([^']+)'", out)) <= UNCACHED_STAGES, out
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], root)


def optimisation(**given):
    """An Optimisation with every field given: the test's values over plain ones (no schedule, no
    clipping, AdamW, AMP as the device allows, seed 0)."""
    from pipeline.train import Optimisation

    plain = {
        "epochs": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": None,
        "accumulate": 1,
        "optimizer": "adamw",
        "amp": "auto",
        "seed": 0,
    }
    return Optimisation(**{**plain, **given})


def sample_starts(shard: Path) -> list[int]:
    """Byte offset of each sample's first member header in a tar shard: where to cut one short."""
    import tarfile

    starts, last = [], None
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            if key != last:
                starts.append(m.offset)
                last = key
    return starts
