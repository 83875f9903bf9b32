"""Where the shard-wise work runs: in this process (`local`) or on the workers of a Ray cluster.

A stage hands the backend a *worker factory* (a picklable zero-argument callable that loads the
model and returns an object with the stage's per-shard methods) and gets back `Workers`: one
worker in this process, or one Ray actor per worker, each loading its model once. Both run the
same per-shard methods on the same inputs, so the results do not depend on the backend:

- `ask(method)` calls a method on every worker and checks they agree (the run key of the parts:
  a cluster whose workers would compute other bytes, CPU and GPU mixed, is an error, not a mix);
- `map(method, jobs, after)` runs one call per job and yields the results in job order; a job
  starts only when the jobs it reads (`after`) are done.

Ray actors, not Ray Data: a job is a whole shard (hundreds to thousands of images), the model is
an actor's state, and a part is written where the local backend writes it; Ray Data's row-wise
streaming would re-batch across shards and lose the one-part-per-shard unit that resume and the
byte-identical outputs rest on. Workers read shards and write parts on the filesystem, so every
node must see the project folder at the same path (one machine, NFS, a KubeRay volume).

On CPU the float rounding of some kernels depends on torch's thread count (YOLO's does), so a Ray
worker runs torch with the threads a local run would use unless told otherwise: its outputs are
then bit-identical to a local run's. Decoding runs in each worker's own pool, as it does locally.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline import parallel
from pipeline.errors import InputError

Progress = Callable[[int], None]

# Passed to every Ray worker: nothing downloads there either, and YOLO finds its settings.
WORKER_ENV = ("HF_HUB_OFFLINE", "YOLO_OFFLINE", "YOLO_CONFIG_DIR", "HF_HOME", "TORCH_HOME")


@dataclass(frozen=True)
class Backend:
    """The `runtime` settings that place the work (none of them is a hashed param)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else a Ray started here
    workers: int | None = None  # Ray workers; None: one per GPU share, else as many as the CPUs allow
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: int | None = None  # CPUs a worker reserves, and its torch threads
    threads: parallel.Count = 2  # runtime.workers: a worker's decode threads (processes in curate)

    @classmethod
    def of(cls, runtime: Any) -> Backend:
        """From the `runtime` params section."""
        ray = runtime.ray
        return cls(
            runtime.backend,
            ray.address,
            ray.workers,
            ray.gpus_per_worker,
            ray.cpus_per_worker,
            runtime.workers,
        )

    def start(self, factory: Callable[[], Any]) -> AbstractContextManager[Workers]:
        """The workers: `factory()` here, or on every Ray actor."""
        return _local(factory) if self.kind == "local" else _ray_workers(self, factory)

    def processes(self) -> AbstractContextManager[tuple[Executor | None, int]]:
        """(executor, slots) for pure, picklable functions (curate's decoding): `threads` spawned
        processes here (None for one: in this process), or Ray tasks of one CPU each, as many
        slots as the cluster has CPUs."""
        return _local_processes(self.threads) if self.kind == "local" else _ray_executor(self)


LOCAL = Backend()


class Workers:
    """What a stage sees of its workers, whatever the backend."""

    size = 1

    def ask(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def map(
        self,
        method: str,
        jobs: Sequence[tuple],
        after: Sequence[Sequence[int]] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[Any]:
        raise NotImplementedError


def _check_order(after: Sequence[Sequence[int]] | None, n: int) -> list[list[int]]:
    deps = [list(a) for a in after] if after is not None else [[] for _ in range(n)]
    if len(deps) != n or any(d >= i or d < 0 for i, a in enumerate(deps) for d in a):
        raise ValueError("after: one list per job, naming earlier jobs only")
    return deps


class LocalWorkers(Workers):
    """One worker, in this process: jobs run in order, with progress as the worker reports it."""

    def __init__(self, worker: Any):
        self.worker = worker

    def ask(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def map(self, method, jobs, after=None, progress=None):
        _check_order(after, len(jobs))  # job order is a dependency order
        fn = getattr(self.worker, method)
        for job in jobs:
            yield fn(*job, progress=progress or (lambda n: None))


@contextmanager
def _local(factory: Callable[[], Any]) -> Iterator[Workers]:
    worker = factory()
    try:
        yield LocalWorkers(worker)
    finally:
        close = getattr(worker, "close", None)
        if close is not None:
            close()


# --- Ray ------------------------------------------------------------------------------------------


class _Actor:
    """A Ray actor: the worker that `factory` loads, with torch on `threads` threads."""

    def __init__(self, factory: Callable[[], Any], threads: int):
        torch.set_num_threads(threads)
        parallel.share_cores(threads)  # runtime.workers "auto": one decode thread per CPU reserved
        self.worker = factory()

    def ask(self, method: str, args: tuple) -> Any:
        return getattr(self.worker, method)(*args)

    def run(self, method: str, job: tuple) -> tuple[Any, int]:
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n

        return getattr(self.worker, method)(*job, progress=progress), done


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: to `address`, to $RAY_ADDRESS, or to a Ray started here for this stage
    (and stopped after it). A Ray the caller already started is used as it is."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": env} if env else None,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def placement(backend: Backend, resources: dict[str, float]) -> tuple[int, int, float]:
    """(workers, CPUs each, GPUs each) on a cluster with these total resources."""
    gpus_total = float(resources.get("GPU", 0))
    cpus_total = float(resources.get("CPU", 1))
    gpus = backend.gpus_per_worker if backend.gpus_per_worker is not None else (1.0 if gpus_total else 0.0)
    if gpus > 0:  # GPU workers: one per GPU share, the CPUs shared among them for decoding
        workers = backend.workers or int(gpus_total // gpus)
        cpus = backend.cpus_per_worker or max(1, int(cpus_total // max(workers, 1)))
    else:  # CPU workers: torch on as many threads as here, unless told (the same float bits)
        cpus = backend.cpus_per_worker or torch.get_num_threads()
        workers = backend.workers or int(cpus_total // cpus)
    fit = min(int(cpus_total // cpus), int(gpus_total // gpus) if gpus else workers)
    if fit < 1:
        raise InputError(
            f"runtime.ray: no worker fits the cluster ({cpus_total:g} CPUs, {gpus_total:g} GPUs) at "
            f"{cpus} CPU(s) and {gpus:g} GPU(s) per worker: lower runtime.ray.cpus_per_worker or "
            "gpus_per_worker"
        )
    if workers > fit:
        # An actor that does not fit would wait for resources forever, and its jobs with it.
        print(
            f"runtime.ray: {workers} workers of {cpus} CPU(s) and {gpus:g} GPU(s) asked for; the cluster "
            f"({cpus_total:g} CPUs, {gpus_total:g} GPUs) holds {fit}: running {fit}",
            file=sys.stderr,
        )
        workers = fit
    return workers, cpus, gpus


def _unwrap(ray: Any, err: Exception) -> Exception:
    """The worker's own exception (an InputError naming the file), not Ray's wrapper of it."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, Exception) else err


class RayWorkers(Workers):
    def __init__(self, ray: Any, actors: list[Any]):
        self.ray, self.actors = ray, actors
        self.size = len(actors)

    def _get(self, refs: Any) -> Any:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            raise _unwrap(self.ray, err) from None

    def ask(self, method: str, *args: Any) -> Any:
        answers = self._get([a.ask.remote(method, args) for a in self.actors])
        if any(a != answers[0] for a in answers):
            raise InputError(
                f"the Ray workers disagree on {method}: {sorted(set(map(str, answers)))}; their outputs "
                "would differ (CPU and GPU workers mixed?): give every worker the same kind of device"
            )
        return answers[0]

    def map(self, method, jobs, after=None, progress=None):
        deps = _check_order(after, len(jobs))
        idle = list(self.actors)
        running: dict[Any, tuple[int, Any]] = {}  # ref → (job, actor)
        finished: set[int] = set()
        results: dict[int, Any] = {}
        waiting = list(range(len(jobs)))
        emitted = 0
        while emitted < len(jobs):
            ready = [i for i in waiting if all(d in finished for d in deps[i])]
            while idle and ready:
                i = ready.pop(0)
                waiting.remove(i)
                actor = idle.pop()
                running[actor.run.remote(method, jobs[i])] = (i, actor)
            done, _ = self.ray.wait(list(running), num_returns=1)
            for ref in done:
                i, actor = running.pop(ref)
                result, units = self._get(ref)
                idle.append(actor)
                finished.add(i)
                results[i] = result
                if progress is not None:
                    progress(units)
            while emitted in results:  # in job order
                yield results.pop(emitted)
                emitted += 1


@contextmanager
def _ray_workers(backend: Backend, factory: Callable[[], Any]) -> Iterator[Workers]:
    with ray_session(backend.address) as ray:
        workers, cpus, gpus = placement(backend, ray.cluster_resources())
        cls = ray.remote(num_cpus=cpus, num_gpus=gpus)(_Actor)
        actors = [cls.remote(factory, cpus) for _ in range(workers)]
        try:
            yield RayWorkers(ray, actors)
        finally:
            for actor in actors:
                ray.kill(actor)


class RayExecutor(Executor):
    """concurrent.futures over Ray tasks of one CPU each: what `parallel.ordered_map` needs."""

    def __init__(self, ray: Any):
        self.ray = ray
        self._call = ray.remote(num_cpus=1)(_call)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        inner = self._call.remote(fn, args, kwargs).future()

        def settle(f: Future) -> None:
            try:
                future.set_result(f.result())
            except Exception as err:  # the task's own exception, unwrapped
                future.set_exception(_unwrap(self.ray, err))

        inner.add_done_callback(settle)
        return future


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


@contextmanager
def _local_processes(workers: parallel.Count) -> Iterator[tuple[Executor | None, int]]:
    with parallel.pool(workers, "processes") as executor:
        yield executor, parallel.count(workers)


@contextmanager
def _ray_executor(backend: Backend) -> Iterator[tuple[Executor | None, int]]:
    with ray_session(backend.address) as ray:
        yield RayExecutor(ray), max(1, int(ray.cluster_resources().get("CPU", 1)))
