"""End to end: the real `dvc repro` on the tiny demo world, in a fresh git repository.

Later stages extend this test as they join the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY_WORLD

pytestmark = pytest.mark.e2e

# What a clone carries that the pipeline needs: its definition and the code its stages depend on.
# Small enough for the tiny world: each source fills its count.
CURATE_MIX = {"coco": 10, "flickr30k": 6, "cc": 6}
PROJECT_FILES = ["dvc.yaml", "demo/dvc.yaml", "demo/weights", ".dvcignore", "pipeline", "stages"]


def sh(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
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
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@dclip.invalid"], root)
    sh(["git", "config", "user.name", "dclip tests"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "pipeline"], root)
    return root


def test_repro_runs_every_stage_then_nothing(repo):
    first = sh(["dvc", "repro"], repo)
    assert "Running stage 'demo/dvc.yaml:world'" in first
    assert "Running stage 'curate'" in first
    assert first.index("demo/dvc.yaml:world") < first.index("Running stage 'curate'")
    world = json.loads((repo / "demo" / "raw" / "world.json").read_text())
    assert world["coco"]["images"] == TINY_WORLD["coco"]["train2014"] + TINY_WORLD["coco"]["val2014"]
    assert (repo / "demo" / "dvc.lock").is_file() and (repo / "dvc.lock").is_file()
    metrics = json.loads((repo / "metrics" / "curate.json").read_text())
    assert {s: metrics["train"][s]["kept_pairs"] for s in CURATE_MIX} == CURATE_MIX
    assert (repo / "data" / "curated" / "train.parquet").is_file()
    # The stage lists exactly the params keys it reads.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["curate"]
    assert set(lock["params"]["params.yaml"]) == {"curate", "sources", "clip.model"}

    second = sh(["dvc", "repro"], repo)
    assert "Running stage" not in second
    assert "didn't change, skipping" in second
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_a_params_edit_reruns_the_world_and_restores_from_cache(repo):
    sh(["dvc", "repro"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    original = yaml.safe_dump(params, sort_keys=False)
    params["world"]["seed"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'demo/dvc.yaml:world'" in sh(["dvc", "repro"], repo)
    # Back to the original params: DVC's run-cache restores the outputs without running.
    (repo / "params.yaml").write_text(original)
    again = sh(["dvc", "repro"], repo)
    assert "is cached - skipping run, checking out outputs" in again
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
