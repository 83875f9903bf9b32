"""DVC can only re-run what a params edit touches if every stage lists, under `params` in dvc.yaml,
exactly the keys its code reads. Checked two ways on the tiny-world project:

- every stage's `run` is called on a copy of the reproduced project with a params object that
  records each key the code reads; the keys read must equal the keys listed (a listed section
  covers its keys);
- a real `dvc repro` after one edit per stage runs exactly that stage and its descendants whose
  inputs changed, nothing upstream; and an edit that cannot change a stage's output re-runs that
  stage alone.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from .helpers import restore, sh

pytestmark = pytest.mark.e2e


class Recorder:
    """A read-only view of a params object that notes the dotted path of every key read: a leaf
    value by its own path; a method (model_dump, …) reads the whole section it is called on."""

    def __init__(self, obj: BaseModel, path: str, seen: set[str]):
        self._obj, self._path, self._seen = obj, path, seen

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        path = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return Recorder(value, path, self._seen)
        self._seen.add(self._path if callable(value) else path)
        return value


def covered(key: str, listed: set[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in listed)


def listed_params() -> dict[str, set[str]]:
    """Stage → params keys listed in the project's dvc.yaml files."""
    from .helpers import REPO

    out = {}
    for file in ("dvc.yaml", "demo/dvc.yaml"):
        for name, stage in yaml.safe_load((REPO / file).read_text())["stages"].items():
            body = stage.get("do", stage)
            out[name] = {p for p in body.get("params", []) if isinstance(p, str)}
    return out


def stage_calls(root: Path) -> dict[str, tuple]:
    """Stage → (module, how to call its run) for every stage that reads params."""
    from stages import curate, detect, distill, embed, evaluate, export, train_teacher, weights, world

    p = root / "params.yaml"
    quiet = {"progress": False}
    return {
        "world": (world, lambda m: m.run(p)),
        "weights": (weights, lambda m: m.run(p)),
        "curate": (curate, lambda m: m.run(p, **quiet)),
        "detect": (detect, lambda m: m.run(p, **quiet)),
        "embed": (embed, lambda m: m.run(p, **quiet)),
        "train_teacher": (train_teacher, lambda m: m.run(p, **quiet)),
        "distill": (distill, lambda m: m.run(p, **quiet)),
        # Both foreach entries run the same code with a --weights given on the command line.
        "evaluate": (evaluate, lambda m: m.run(p, "student", "models/student.pt", **quiet)),
        "export": (export, lambda m: m.run(p)),
    }


def test_every_stage_lists_exactly_the_params_keys_its_code_reads(reproduced, tmp_path, monkeypatch):
    # A copy, so that re-running stages in this process leaves the shared project untouched; the
    # copy keeps the resumable parts and checkpoints, so each stage finishes quickly.
    root = tmp_path / "copy"
    shutil.copytree(reproduced.root, root, symlinks=True, ignore=shutil.ignore_patterns(".dvc", ".git"))
    monkeypatch.chdir(root)
    listed = listed_params()
    for name, (module, call) in stage_calls(root).items():
        seen: set[str] = set()
        real = module.load_params

        def recording(*args, _real=real, _seen=seen, **kwargs):
            return Recorder(_real(*args, **kwargs), "", _seen)

        monkeypatch.setattr(module, "load_params", recording)
        call(module)
        monkeypatch.setattr(module, "load_params", real)
        # runtime.* is read and listed by no stage: where the work runs must not re-run it.
        unlisted = {k for k in seen if not covered(k, listed[name]) and not covered(k, {"runtime"})}
        unread = {k for k in listed[name] if not any(covered(s, {k}) or covered(k, {s}) for s in seen)}
        assert not unlisted, f"{name} reads {sorted(unlisted)} but dvc.yaml does not list them"
        assert not unread, f"{name}: dvc.yaml lists {sorted(unread)} but the code never reads them"
    assert set(listed) == set(stage_calls(root)) | {"report"}


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


DOWNSTREAM_OF_TEACHER = {"train_teacher", "distill", "evaluate@student", "report", "export"}
# A key of each stage → the stages a change to it re-runs: the stage, then every descendant whose
# inputs the change alters; nothing upstream.
RERUNS = {
    ("evaluate", "prompts", "openai"): {"evaluate@base", "evaluate@student", "report", "export"},
    ("distill", "lambda_cos", 0.5): {"distill", "evaluate@student", "report", "export"},
    ("teacher", "use_epoch", 2): DOWNSTREAM_OF_TEACHER,
    ("embed", "weights", "uniform"): {"embed"} | DOWNSTREAM_OF_TEACHER,
    ("detect", "max_regions", 1): {"detect", "embed"} | DOWNSTREAM_OF_TEACHER,
    # The seed draws the training pairs; the evaluation sets do not depend on it and come out
    # byte-identical, so the base CLIP is not evaluated again.
    ("curate", "seed", 1): {"curate", "detect", "embed"} | DOWNSTREAM_OF_TEACHER,
    ("detector", "weights", "none"): {"weights", "detect", "embed"} | DOWNSTREAM_OF_TEACHER,
}


@pytest.mark.parametrize("section,key,value", list(RERUNS), ids=lambda v: str(v))
def test_a_params_edit_reruns_that_stage_and_its_descendants_only(reproduced, section, key, value):
    repo = reproduced.root
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params[section][key] != value
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert ran(sh(["dvc", "repro"], repo)) == RERUNS[section, key, value]
    finally:
        restore(repo)


def test_an_edit_that_cannot_change_an_output_reruns_that_stage_alone(reproduced):
    repo = reproduced.root
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # Every class of the demo detector named, against null (every class): detect runs again to the
    # same bytes and embed is skipped.
    from pipeline.demo.world.scene import SHAPES

    params["detect"]["classes"] = list(SHAPES)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = sh(["dvc", "repro"], repo)
        assert ran(out) == {"detect"}
        assert "Stage 'embed' didn't change, skipping" in out
    finally:
        restore(repo)


def test_runtime_keys_are_listed_by_no_stage_and_re_run_nothing(reproduced):
    """Where and how fast the work runs is not a param: a colleague on another machine (more
    workers, a GPU, other batch sizes, another scratch disk, a Ray cluster, 8 DDP processes) finds
    every stage up to date and pulls instead of recomputing."""
    assert not any(k.split(".")[0] == "runtime" for keys in listed_params().values() for k in keys)
    repo = reproduced.root
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["runtime"] = {
        "device": "cpu",
        "workers": 7,
        "batch_size": {"detect": 3, "embed": 5, "evaluate": 11},
        "scratch": "data/scratch-elsewhere",
        "backend": "ray",
        "ray": {"address": "ray://head:10001", "workers": 64, "gpus_per_worker": 0.5, "cpus_per_worker": 6},
        "processes": 8,
    }
    assert params["runtime"] != yaml.safe_load((repo / "params.yaml").read_text())["runtime"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert "Data and pipelines are up to date." in sh(["dvc", "status"], repo)
        assert ran(sh(["dvc", "repro"], repo)) == set()
    finally:
        restore(repo)
