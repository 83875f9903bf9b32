"""Fault injection on the tiny world: every stage that does real work is killed (SIGKILL, its whole
process group) at seeded random points, run again, and must end byte-identical to the
uninterrupted run; a shard cut short, at a member boundary or inside a member, stops each stage
that reads it (curated shards, embed's teacher shards) with one `error:` line and no output."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_params

from .helpers import sample_starts

# What each stage makes (params keys of its outputs) and its folder of resumable work under
# runtime.scratch.
STAGES = {
    "curate": (["curate.out"], None),
    "detect": (["detect.out"], "detect"),
    "embed": (["embed.out"], "embed"),
    "train-teacher": (["teacher.out", "teacher.targets"], "teacher"),
    "distill": (["distill.out"], "distill"),
}
KILLS_PER_STAGE = 2
WATCHED = ("data", "models")  # where a stage's first write shows that its work has begun


def _value(params, dotted: str) -> str:
    node = params
    for key in dotted.split("."):
        node = getattr(node, key)
    return str(node)


def _scratch(params, folder: str) -> str:
    return f"{params.runtime.scratch}/{folder}"


def digest_tree(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for top in WATCHED:
        for dirpath, _, names in os.walk(root / top):
            for name in names:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # renamed away between listing and stat
                    continue
                out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return out


def run_stage(root: Path, stage: str, kill_after: float | None = None) -> tuple[int, float, float]:
    """Run `dclip <stage>`; with kill_after, SIGKILL its process group that many seconds after its
    first write under data/ or models/ (imports and model loading do not count). Returns the exit
    code (-9 when killed), the seconds until the first write and the seconds of work after it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    before = _snapshot(root)
    start = time.monotonic()
    proc = subprocess.Popen(
        ["dclip", stage, "--params", "params.yaml"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: workers die with it
    )
    first: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if first is None and _snapshot(root) != before:
            first = now
        if kill_after is not None and first is not None and now - first >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, first - start, now - first
        time.sleep(0.02)
    end = time.monotonic()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 0, f"dclip {stage} failed:\n{stderr[-3000:]}"
    first = first if first is not None else end
    return proc.returncode, first - start, end - first


@pytest.fixture(scope="module")
def project(reproduced, tmp_path_factory) -> Path:
    """A copy of the reproduced tiny-world project (outputs of one uninterrupted run)."""
    root = tmp_path_factory.mktemp("faults") / "project"
    shutil.copytree(reproduced.root, root, symlinks=True, ignore=shutil.ignore_patterns(".dvc", ".git"))
    return root


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_at_random_points_resumes_to_the_same_bytes(project, stage):
    params = load_params(project / "params.yaml")
    outs, scratch = STAGES[stage]
    paths = [_value(params, key) for key in outs]
    reference = {k: v for p in paths for k, v in digest_tree(project, p).items()}
    assert reference, f"{stage}: the reproduced project has no outputs"

    def clean() -> None:
        for rel in paths + ([_scratch(params, scratch)] if scratch else []):
            target = project / rel
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    # An uninterrupted run from nothing: the same bytes, and how long the work takes.
    clean()
    _, _, work = run_stage(project, stage)
    assert {k: v for p in paths for k, v in digest_tree(project, p).items()} == reference
    rng = random.Random(f"faults:{stage}")
    killed = 0
    for _ in range(KILLS_PER_STAGE):
        clean()
        code, _, _ = run_stage(project, stage, kill_after=rng.uniform(0.05, 0.7) * work)
        killed += code == -9
        run_stage(project, stage)  # resumes from what the killed run left
        got = {k: v for p in paths for k, v in digest_tree(project, p).items()}
        assert got == reference, f"{stage}: after a kill, the outputs differ from an uninterrupted run"
    assert killed, f"{stage}: finished before every kill point; the test killed nothing"


# The shards each reader reads: curated training shards, and embed's teacher shards.
READS = {"detect": "curate.out/train", "embed": "curate.out/train", "distill": "curate.out/train"}
READS["train-teacher"] = "embed.out/teacher"


@pytest.mark.parametrize("cut", ["boundary", "mid-member"])
@pytest.mark.parametrize("stage", list(READS))
def test_a_shard_cut_short_stops_each_reader_with_one_line(project, tmp_path, stage, cut):
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    params = load_params(root / "params.yaml")
    key, sub = READS[stage].split("/")
    shard = sorted((root / _value(params, key) / sub).glob("*.tar"))[0]
    starts = sample_starts(shard)
    end = starts[-2] if cut == "boundary" else starts[-2] + 600
    shard.write_bytes(shard.read_bytes()[:end])
    outs, scratch = STAGES[stage]
    for rel in [_value(params, k) for k in outs] + [_scratch(params, scratch)]:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["dclip", stage, "--params", "params.yaml"], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"{shard.relative_to(root)}: truncated" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not any((root / _value(params, k)).exists() for k in outs)
