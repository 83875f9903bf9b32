"""End to end: the real `dvc repro` on the tiny demo world, in a fresh git repository.

Later stages extend this test as they join the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
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
    # A few quick epochs: the test is about the wiring, not the numbers.
    params["teacher"].update(epochs=2, use_epoch=1, batch_size=8, heads=4, val_fraction=0.2, warmup_steps=1)
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
    # detect: a row per training image (the 3 shards of 8, 8 and 6 pairs), after curate.
    assert first.index("Running stage 'curate'") < first.index("Running stage 'detect'")
    detect = json.loads((repo / "metrics" / "detect.json").read_text())
    assert (detect["shards"], detect["images"], detect["rejects"]) == (3, sum(CURATE_MIX.values()), 0)
    assert detect["regions"] >= detect["images"] - detect["images_without_detections"] > 0
    assert pq.read_table(repo / "data" / "regions.parquet").num_rows == detect["images"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["detect"]
    assert set(lock["params"]["params.yaml"]) == {"detect", "detector", "curate.out"}
    # embed: every pair, after detect; the whole image is region 0 of each; a teacher shard per
    # curated shard.
    assert first.index("Running stage 'detect'") < first.index("Running stage 'embed'")
    embed = json.loads((repo / "metrics" / "embed.json").read_text())
    assert (embed["pairs"], embed["images"], embed["rejects"]) == (detect["images"], detect["images"], 0)
    assert embed["regions"] == embed["images"] + detect["regions"]
    teacher = sorted(p.name for p in (repo / "data" / "embeddings" / "teacher").glob("*.tar"))
    assert teacher == sorted(p.name for p in (repo / "data" / "curated" / "train").glob("*.tar"))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["embed"]
    assert set(lock["params"]["params.yaml"]) == {"embed", "clip", "curate.out", "detect.out"}
    # evaluate@base after curate (it needs only the evaluation sets), then the report.
    assert first.index("Running stage 'curate'") < first.index("Running stage 'evaluate@base'")
    assert first.index("Running stage 'evaluate@base'") < first.index("Running stage 'report'")
    base = json.loads((repo / "metrics" / "base.json").read_text())
    assert base["retrieval"]["coco"]["images"] == TINY_WORLD["coco"]["karpathy_test"]
    assert set(base["zeroshot"]) == {"imagenet", "cifar10", "cifar100"}
    assert "metrics/base.json" in sh(["dvc", "metrics", "show"], repo)
    assert (repo / "metrics" / "recall" / "base.csv").is_file()
    assert "| COCO (15 images" in (repo / "metrics" / "report.md").read_text()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["evaluate@base"]
    assert set(lock["params"]["params.yaml"]) == {"evaluate", "clip.model", "curate.out"}

    # train_teacher after embed: targets for every pair; distill after it; the student is
    # evaluated and reported beside the base, the compositional probe included.
    assert first.index("Running stage 'embed'") < first.index("Running stage 'train_teacher'")
    assert first.index("Running stage 'train_teacher'") < first.index("Running stage 'distill'")
    assert first.index("Running stage 'distill'") < first.index("Running stage 'evaluate@student'")
    teacher_metrics = json.loads((repo / "metrics" / "teacher.json").read_text())
    assert teacher_metrics["targets"] == embed["pairs"] and len(teacher_metrics["epochs"]) == 2
    targets = pq.read_table(repo / "data" / "teacher_targets.parquet")
    captions = pq.read_table(repo / "data" / "embeddings" / "captions.parquet")
    assert sorted(targets.column("key").to_pylist()) == sorted(captions.column("key").to_pylist())
    distilled = json.loads((repo / "metrics" / "distill.json").read_text())
    assert distilled["text_tower_unchanged"] and distilled["pairs"] == embed["pairs"]
    assert (repo / "models" / "student.pt").is_file()
    assert (repo / "metrics" / "distill" / "plots" / "metrics").is_dir()
    student = json.loads((repo / "metrics" / "student.json").read_text())
    assert set(student["probe"]["sugarcrepe"]["accuracy"]) >= {"swap_att", "replace_rel", "mean"}
    report = (repo / "metrics" / "report.md").read_text()
    assert "Δ student" in report and "## Compositional probe" in report
    for stage, keys in {
        "train_teacher": {"teacher", "embed.out"},
        "distill": {"distill", "clip", "curate.out", "embed.out", "teacher.targets"},
    }.items():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
        assert set(lock["params"]["params.yaml"]) == keys

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
