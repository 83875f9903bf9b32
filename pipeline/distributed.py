"""Data-parallel training (train_teacher, distill) on several processes: the process group that
torchrun (or srun) describes in the environment, each rank's share of a global batch, the
all-gather that lets a contrastive loss see the whole global batch, and gradient averaging.

One process (no WORLD_SIZE in the environment, or WORLD_SIZE 1) initialises nothing, and every
function here is then the identity or a no-op: a one-process run computes exactly what it
computed before this module existed, bit for bit.

How W processes compute the step of one process on the global batch:
- every rank computes the same seeded epoch order (it depends on seed and epoch alone) and takes a
  contiguous share of each global batch (`split`), so that the global batch is the one-process
  batch; a share is batch_size / W rows (the training batch sizes must divide by W:
  `check_batch_size`), and a last, short batch is shared as evenly as it goes;
- the losses `gather` the rows of every rank, with gradients, as open_clip's ClipLoss does with
  gather_with_grad: each rank computes the loss of the whole global batch, InfoNCE's negatives
  included, identical on every rank. The backward of the gather sums what every rank's copy of the
  loss sends back to a rank's rows, W times the one-process gradient of those rows;
- `average_gradients` then sums the ranks' gradients and divides by W: the one-process gradient of
  the global batch, up to float rounding (the order of the sums).

Launch: `torchrun_command` is what a stage run with runtime.processes > 1 runs (stages/launch.py);
`joined` is what every process of such a run (or of a user's own torchrun or srun) enters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, overload

import torch
import torch.distributed as dist

from pipeline import parallel
from pipeline.errors import InputError, ParamsError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size`, and on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and the stage's outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Context()


def from_env(env: Mapping[str, str] = os.environ) -> Context:
    """The context torchrun (or srun with torchrun's variables) describes: RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE; one process when WORLD_SIZE is not set."""
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise InputError(f"torch.distributed environment: {err}") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise InputError(
            f"torch.distributed environment: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local_rank}, "
            f"LOCAL_WORLD_SIZE {local_world} do not go together"
        )
    return Context(rank, world, local_rank, local_world)


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> Context:
    """This process's context: from the initialised process group, else one process."""
    if not initialised():
        return SINGLE
    rank, world = dist.get_rank(), dist.get_world_size()
    env = os.environ
    return Context(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)))


# --- launch ---------------------------------------------------------------------------------


def should_launch(processes: int, env: Mapping[str, str] = os.environ) -> bool:
    """Whether a stage asked for `processes` must start them itself: more than one, and this
    process is not already one that torchrun or srun started (no WORLD_SIZE)."""
    return processes > 1 and "WORLD_SIZE" not in env


def torchrun_command(processes: int, argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """torchrun on this machine with `processes` processes, each running `python argv…`."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        *argv,
    ]


def launch(processes: int, argv: Sequence[str]) -> int:
    """Run `argv` under torchrun with `processes` processes on this machine; wait and return its
    exit code (torchrun stops every process when one fails, and then exits with 1). Unless the
    user set it, OMP_NUM_THREADS is the cores shared among the processes (torchrun would set 1,
    and say so), as `joined` sets torch's threads."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, parallel.machine_cores() // processes)))
    return subprocess.run(torchrun_command(processes, argv), env=env).returncode


def check_batch_size(batch_size: int, world_size: int, param: str) -> None:
    """Every process takes an equal share of each global batch: the batch must divide by them."""
    if batch_size % world_size:
        raise ParamsError(
            f"{param}: {batch_size} does not divide by the {world_size} processes (runtime.processes, "
            "or WORLD_SIZE under torchrun / srun): each process takes an equal share of every batch"
        )


@contextmanager
def joined(device_name: str = "auto") -> Iterator[tuple[Context, torch.device]]:
    """This process's context and device, as one rank of the run the environment describes:
    the process group is initialised (gloo on the CPU, nccl on CUDA with device cuda:LOCAL_RANK)
    and destroyed on the way out; a group the caller initialised already (Ray Train's
    TorchTrainer starts its own) is used as it is and left to the caller. On the CPU, torch's
    threads are the cores shared among this machine's processes (at least one each), so that they
    do not oversubscribe the cores. One process (no WORLD_SIZE): nothing is initialised and
    nothing is changed."""
    from pipeline.runtime import pick_device

    ctx = from_env()
    if not ctx.distributed:
        yield ctx, pick_device(device_name)
        return
    # runtime.workers "auto": this rank's decode threads, one per core of its share
    share = max(1, parallel.machine_cores() // ctx.local_world_size)
    parallel.share_cores(share)
    device = pick_device(device_name, quiet=not ctx.is_main)
    if device.type == "cuda":
        if device.index is not None:
            raise ParamsError(
                f"runtime.device: {device_name!r} names one GPU, and each of the {ctx.world_size} "
                "processes uses its own (cuda:LOCAL_RANK): use cuda or auto"
            )
        if ctx.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {ctx.local_rank}: torch sees {torch.cuda.device_count()} GPU(s) on this machine"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(share)
    ours = not initialised()
    if ours:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
        raise InputError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not the one the "
            f"environment describes (RANK {ctx.rank}, WORLD_SIZE {ctx.world_size})"
        )
    if ctx.is_main:
        print(f"data-parallel: {ctx.world_size} processes, {dist.get_backend()}", file=sys.stderr)
    yield ctx, device
    # Not on an error: the others may be waiting in a collective; torchrun stops them.
    if ours:
        dist.destroy_process_group()
    parallel.share_cores(None)


def barrier() -> None:
    if initialised() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors for a collective must be: nccl takes CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int) -> int:
    """Rank 0's value, on every rank."""
    if not initialised() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, 0)
    return int(t.item())


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over the ranks of each value (the same keys, in the same order, on every rank),
    identical on every rank; in float64, so that values already identical on every rank (the
    global losses) come back as they are. One process: the values themselves."""
    if not initialised() or dist.get_world_size() == 1:
        return dict(values)
    keys = list(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# --- a rank's share of a global batch ---------------------------------------------------------


def split(n: int, ctx: Context) -> tuple[range, tuple[int, ...]]:
    """This rank's rows of a global batch of `n` rows, and how many rows every rank holds.

    Contiguous and as even as it goes: rank r takes rows [r·n // W, (r+1)·n // W), so a batch that
    divides by W gives each rank n / W rows. A rank whose share is empty (a last batch of fewer
    rows than ranks) computes row 0 as a stand-in: every rank then runs the same forward and
    backward passes and collectives, and `gather` leaves the stand-in out of the global batch."""
    world = ctx.world_size
    counts = tuple((r + 1) * n // world - r * n // world for r in range(world))
    lo = ctx.rank * n // world
    if counts[ctx.rank] == 0 and n > 0:
        return range(0, 1), counts
    return range(lo, lo + counts[ctx.rank]), counts


def local_rows(items: Sequence[T], ctx: Context) -> tuple[list[T], tuple[int, ...]]:
    """This rank's items of a global batch (see `split`) and every rank's count."""
    rows, counts = split(len(items), ctx)
    return [items[i] for i in rows], counts


_DEPRECATION = r"torch\.distributed\.nn\.functional\.all_gather is deprecated"


@overload
def gather(t: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor: ...
@overload
def gather(t: None, counts: Sequence[int] | None = None) -> None: ...
def gather(t: torch.Tensor | None, counts: Sequence[int] | None = None) -> torch.Tensor | None:
    """The rows of every rank, in rank order: the global batch of a per-row tensor whose rows on
    this rank are its share (`split`), with gradients flowing back to each rank's own rows
    (torch.distributed.nn.functional.all_gather). `counts`: the rows each rank holds (None: all
    as many as this rank); a stand-in row (a count of 0) is left out. One process, or None: `t`."""
    if t is None or not initialised() or dist.get_world_size() == 1:
        return t
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = tuple(counts) if counts is not None else (len(t),) * world
    if len(counts) != world or len(t) != max(counts[rank], 1):
        raise ValueError(f"rank {rank} holds {len(t)} rows, and the counts say {counts}")
    width = max(1, *counts)  # all_gather takes tensors of one shape: the short shares padded
    if len(t) < width:
        t = torch.cat([t, t.new_zeros((width - len(t), *t.shape[1:]))])
    boolean = t.dtype == torch.bool
    if boolean:
        t = t.to(torch.uint8)
    if t.requires_grad:
        import torch.distributed.nn.functional as dist_nn

        # Deprecated in torch 2.14 for a private API (_functional_collectives); still the public
        # all-gather with a backward, the one open_clip's ClipLoss uses.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DEPRECATION, FutureWarning)
            parts = list(dist_nn.all_gather(t))
    else:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.bool() if boolean else out


# --- keeping the replicas identical ------------------------------------------------------------


def _buckets(tensors: Iterable[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Runs of tensors of one dtype and device, up to `limit` bytes each (one tensor at least)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + t.nbytes > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.nbytes
    if bucket:
        yield bucket


def _flat(tensors: Iterable[torch.Tensor], op: Callable[[torch.Tensor], None], limit: int) -> None:
    """`op` on the tensors flattened into buckets (a few large collectives rather than one per
    tensor), the results copied back in place."""
    for bucket in _buckets(tensors, limit):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        op(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


BUCKET_BYTES = 25 << 20  # as DDP's default bucket


def average_gradients(params: Iterable[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Each gradient summed over the ranks and divided by their number, in place. Every rank
    runs the same code on the same parameters, so the same parameters have a gradient on every
    rank (those without one, None everywhere, are left out as the optimiser leaves them out)."""
    if not initialised() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()

    def average(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat /= world

    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        _flat(grads, average, bucket_bytes)


def broadcast_state(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless `buffers_only`) and buffers on every rank, in place."""
    if not initialised() or dist.get_world_size() == 1:
        return
    tensors = [b for b in module.buffers()]
    if not buffers_only:
        tensors = [p.detach() for p in module.parameters()] + tensors

    def from_rank_0(flat: torch.Tensor) -> None:
        dist.broadcast(flat, 0)

    with torch.no_grad():
        _flat(tensors, from_rank_0, BUCKET_BYTES)
