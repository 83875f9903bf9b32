"""The execution backend (pipeline.backend): the same per-shard work in this process or on a real
local Ray with 2 CPUs, with the same results, in job order, waiting for the jobs a job reads; and
the pipeline's stages on the Ray backend reproduce the tiny world byte for byte, and a Ray run
killed mid-stage is finished by the local backend."""

from __future__ import annotations

import io
import os
import sys
import time
from functools import partial
from pathlib import Path

import cloudpickle
import pytest
import yaml

from pipeline import backend as be
from pipeline import parallel, parts
from pipeline.errors import InputError
from tests.helpers import restore, sh

# Ray workers import what they run; this module's workers travel by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Squares(parts.PartMaker):
    """A worker with a model-like state (an offset loaded once) and a log of what it did."""

    def __init__(self, offset: int, log: str | None = None):
        self.offset, self.log = offset, log

    def key(self) -> str:
        return f"offset {self.offset}"

    def square(self, x: int, *, progress) -> int:
        if x < 0:
            raise InputError(f"job {x}: negative")
        time.sleep(0.05 * (x % 3))  # finish out of order on two workers
        progress(x)
        return x * x + self.offset

    def stamp(self, name: str, *, progress) -> float:
        """The time this job ran, and a file in `log` named after it (it must see its `after`)."""
        assert self.log is not None
        seen = sorted(os.listdir(self.log))
        Path(self.log, name).write_text(" ".join(seen))
        return time.time()

    def make(self, tmp: Path, value: int, *, progress) -> None:
        tmp.write_text(str(value + self.offset))
        progress(1)


@pytest.fixture(scope="module")
def ray_here():
    """A real Ray on this machine, 2 CPUs, shared by this module's unit tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


RAY = be.Backend("ray", workers=2, cpus_per_worker=1)


@pytest.mark.parametrize("backend", [be.LOCAL, RAY], ids=["local", "ray"])
def test_map_gives_results_in_job_order_and_counts_progress(backend, request):
    if backend.kind == "ray":
        request.getfixturevalue("ray_here")
    done: list[int] = []
    with backend.start(partial(Squares, 10)) as workers:
        assert workers.ask("key") == "offset 10"
        out = list(workers.map("square", [(x,) for x in range(7)], progress=done.append))
    assert out == [10, 11, 14, 19, 26, 35, 46]
    assert sorted(done) == [0, 1, 2, 3, 4, 5, 6] if backend.kind == "ray" else done == list(range(7))


def test_ray_runs_a_job_only_after_the_jobs_it_reads(ray_here, tmp_path):
    # Job 3 reads jobs 0 and 2, job 2 reads job 1: with two workers, 1 and 0 start together.
    after = [[], [], [1], [0, 2]]
    with RAY.start(partial(Squares, 0, str(tmp_path))) as workers:
        list(workers.map("stamp", [(f"job{i}",) for i in range(4)], after))
    assert set((tmp_path / "job2").read_text().split()) >= {"job1"}
    assert set((tmp_path / "job3").read_text().split()) >= {"job0", "job1", "job2"}


def test_after_must_name_earlier_jobs():
    with be.LOCAL.start(partial(Squares, 0)) as workers:
        with pytest.raises(ValueError, match="earlier jobs"):
            list(workers.map("square", [(1,), (2,)], [[1], []]))


def test_a_workers_error_reaches_the_stage_as_its_own_exception(ray_here):
    with RAY.start(partial(Squares, 0)) as workers:
        with pytest.raises(InputError, match="job -2: negative"):
            list(workers.map("square", [(1,), (-2,), (3,)]))


def test_workers_that_would_compute_other_bytes_are_an_error(ray_here):
    class Disagree:
        def __init__(self):
            self.pid = os.getpid()

        def key(self):
            return self.pid

    with RAY.start(Disagree) as workers:
        with pytest.raises(InputError, match="disagree on key"):
            workers.ask("key")


class DecodeWorkers:
    """A worker that reports how many decode workers runtime.workers `setting` gives it."""

    def __init__(self, setting: parallel.Count):
        self.count = parallel.count(setting)

    def key(self) -> int:
        return self.count


def test_auto_decode_workers_follow_the_cores_a_process_is_given(monkeypatch):
    monkeypatch.setattr(parallel, "_share", None)
    assert (
        parallel.count("auto") == parallel.cores() == parallel.machine_cores() == len(os.sched_getaffinity(0))
    )
    assert parallel.count(3) == 3
    parallel.share_cores(5)
    assert parallel.count("auto") == 5 and parallel.count(2) == 2
    parallel.share_cores(None)
    assert parallel.count("auto") == parallel.machine_cores()


def test_auto_decode_workers_of_a_ray_worker_are_the_cpus_it_reserved(ray_here):
    with RAY.start(partial(DecodeWorkers, "auto")) as workers:  # 1 CPU each
        assert workers.ask("key") == 1
    with be.Backend("ray", workers=1, cpus_per_worker=2).start(partial(DecodeWorkers, "auto")) as workers:
        assert workers.ask("key") == 2
    with RAY.start(partial(DecodeWorkers, 3)) as workers:  # a number stays that number
        assert workers.ask("key") == 3


def test_placement_follows_the_cluster():
    cpu_only = {"CPU": 16.0}
    assert be.placement(be.Backend("ray", cpus_per_worker=4), cpu_only) == (4, 4, 0.0)
    gpus = {"CPU": 64.0, "GPU": 8.0}
    assert be.placement(be.Backend("ray", cpus_per_worker=6), gpus) == (8, 6, 1.0)
    assert be.placement(be.Backend("ray"), gpus) == (8, 8, 1.0)  # the CPUs shared among GPU workers
    assert be.placement(be.Backend("ray", gpus_per_worker=0), gpus)[2] == 0.0
    assert be.placement(be.Backend("ray", cpus_per_worker=2, gpus_per_worker=0.5), gpus) == (16, 2, 0.5)
    assert be.placement(be.Backend("ray", workers=3, cpus_per_worker=1), cpu_only) == (3, 1, 0.0)
    # More than the cluster holds would wait forever: as many as fit.
    assert be.placement(be.Backend("ray", workers=9, cpus_per_worker=4), cpu_only) == (4, 4, 0.0)
    assert be.placement(be.Backend("ray", workers=9), gpus) == (8, 7, 1.0)
    with pytest.raises(InputError, match="no worker fits"):
        be.placement(be.Backend("ray", cpus_per_worker=32), cpu_only)


@pytest.mark.parametrize("backend", [be.LOCAL, RAY], ids=["local", "ray"])
def test_parts_made_by_either_backend_are_reused_by_the_other(backend, request, tmp_path):
    if backend.kind == "ray":
        request.getfixturevalue("ray_here")
    jobs = [parts.Job(f"p{i}", (i,)) for i in range(4)]
    other = RAY if backend.kind == "local" else be.LOCAL
    with backend.start(partial(Squares, 100)) as workers:
        store = parts.Parts(tmp_path, parts.digest("run"))
        list(store.compute(jobs[:2], workers))
    assert [p.read_text() for p in store.used] == ["100", "101"]
    if other.kind == "ray":
        request.getfixturevalue("ray_here")
    with other.start(partial(Squares, 100)) as workers:
        store = parts.Parts(tmp_path, parts.digest("run"))
        reused = [r for _, r in store.compute(jobs, workers)]
    assert reused == [True, True, False, False]
    assert [p.read_text() for p in store.used] == ["100", "101", "102", "103"]


def test_curate_decoding_on_ray_gives_the_local_bytes(ray_here):
    from PIL import Image

    from pipeline.curate import Decoder, prepare

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 30 + 2 * i), (5 * i, 255 - 3 * i, 90)).save(buf, "JPEG", quality=95)
        return buf.getvalue()

    payloads = [(i, jpeg(i)) for i in range(40)]
    fn = partial(prepare, size=32, quality=90)
    with Decoder(be.Backend(threads=2)) as decoder:
        local = list(decoder.map(fn, payloads))
    with Decoder(be.Backend("ray")) as decoder:
        on_ray = list(decoder.map(fn, payloads))
    assert [m for m, _ in on_ray] == list(range(40))
    assert [r.jpeg for _, r in on_ray] == [r.jpeg for _, r in local]


# --- the stages on the Ray backend ----------------------------------------------------------------

RAY_STAGES = ["curate", "detect", "embed", "evaluate@base"]


def _use(repo: Path, **runtime) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["runtime"].update(runtime)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.e2e
def test_ray_backend_reproduces_the_tiny_world_byte_for_byte(reproduced):
    """Each shard-wise stage run again, on a local Ray of 2 CPUs: every output hash in dvc.lock
    stays as the local run wrote it, and switching the backend re-runs nothing."""
    repo = reproduced.root
    _use(repo, backend="ray", ray={"workers": 2, "cpus_per_worker": None})
    try:
        assert "Data and pipelines are up to date." in sh(["dvc", "status"], repo)
        for stage in RAY_STAGES:
            out = sh(["dvc", "repro", "-f", "-s", stage], repo, env={"RAY_ADDRESS": ""})
            assert '"backend": "ray"' in out, out
        assert sh(["git", "diff", "--stat", "dvc.lock"], repo) == ""
    finally:
        restore(repo)


@pytest.mark.e2e
def test_a_ray_run_cut_short_is_finished_by_the_local_backend(reproduced):
    """detect on Ray, cut short: two of its parts kept, the others gone and one left half-written
    (a worker killed mid-part). The local backend keeps the two (the same files, not recomputed),
    drops the half-written one, makes the rest, and the output is the locked one."""
    repo = reproduced.root
    scratch = repo / "data" / "scratch" / "detect"
    sh(["rm", "-rf", str(scratch)], repo)
    _use(repo, backend="ray", ray={"workers": 2, "cpus_per_worker": None})
    try:
        sh(["dclip", "detect"], repo, env={"RAY_ADDRESS": ""})
        made = sorted(scratch.glob("*/*.parquet"))
        assert len(made) >= 4
        kept = {p: p.stat().st_mtime_ns for p in made[:2]}
        for p in made[2:]:
            p.unlink()
        half = made[2].with_name(f".{made[2].name}.tmp-4242")
        half.write_bytes(b"PAR1 cut")
        sh(["git", "checkout", "--", "params.yaml"], repo)
        sh(["dvc", "repro", "-f", "-s", "detect"], repo)
        assert {p: p.stat().st_mtime_ns for p in kept} == kept  # kept, not recomputed
        assert all(p.exists() for p in made) and not half.exists()
        assert sh(["git", "diff", "--stat", "dvc.lock"], repo) == ""
    finally:
        restore(repo)
