"""One training loop for the teacher and the student: device, AMP, gradient accumulation and
clipping, a per-step warm-up + cosine schedule, an atomic checkpoint every epoch, and resume.

Resume is exact on CPU: an epoch's data order and random state derive from (seed, epoch) alone,
never from how many epochs ran in this process, so a run killed after epoch k and resumed from
its checkpoint reproduces the uninterrupted run's weights.

Data-parallel (pipeline/distributed.py), when the process group is initialised: `data(epoch)`
yields this rank's share of each global batch and `loss_fn` returns the global batch's loss (it
gathers every rank's rows); the gradients are averaged over the ranks before each optimiser step,
so that one step of W processes is the one-process step on the global batch. Rank 0 writes the
checkpoints while the others wait; every rank resumes from the one rank 0 finds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import distributed, runtime
from pipeline.errors import InputError
from pipeline.files import atomic_torch_save

LossFn = Callable[[Any], dict[str, torch.Tensor]]  # a batch → named terms, "total" among them


@dataclass(frozen=True)
class Optimisation:
    """How a model is trained (the training keys of the `teacher` and `distill` params)."""

    epochs: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None  # max global gradient norm; None: no clipping
    accumulate: int  # batches per optimiser step
    optimizer: str  # adamw or adam
    amp: str  # auto: bf16 (or fp16 with loss scaling) on CUDA, none on CPU; or bf16, fp16, off
    seed: int

    def __post_init__(self):
        if self.epochs < 1 or self.accumulate < 1 or self.lr <= 0:
            raise ValueError(f"epochs and accumulate must be >= 1 and lr > 0: {self}")
        if self.optimizer not in ("adamw", "adam") or self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"unknown optimizer or amp: {self}")


# Never decayed, whatever their shape: decay would pull them toward zero, which for these means
# toward no position, no class token, no temperature — not toward a simpler model.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters as two optimiser groups, as open_clip's trainer groups them:
    weight decay for matrices and convolution kernels; none for 1-D parameters (biases, norm and
    BatchNorm weights, the logit scale) and for positional and class embeddings."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(NO_DECAY_NAMES)
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total` — stepped per
    optimiser step, so the rate really decays within a two-epoch run."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def contrastive_batches(pairs: int, batch_size: int) -> int:
    """Batches an epoch of `pairs` gives when a last batch of one pair is dropped (a contrastive
    loss needs a negative) and a last batch of two or more is kept."""
    return pairs // batch_size + (pairs % batch_size >= 2)


# Dropout and the like draw from torch's generator, seeded per epoch; rank r > 0 of a
# data-parallel run draws from its own stream, this far from rank 0's (a rank's mask covers its own
# rows only, so with dropout a W-process run draws other masks than one process: the same
# distribution, not the same numbers; the models here have none by default).
RANK_SEED_STRIDE = 1 << 40


class Trainer:
    """Trains `params` of `model` with `loss_fn` over `data(epoch)`, checkpointing every epoch
    into `checkpoints/epoch-<k>.pt`; `fit` resumes from the latest checkpoint found there.

    Several processes: the gradients are averaged by hand (`distributed.average_gradients`, one
    all-reduce per optimiser step, in DDP-sized buckets) rather than by wrapping the model in
    DistributedDataParallel. The losses call model methods other than forward (the student's
    `encode_image`), which DDP's hooks do not see unless every call goes through its wrapper;
    accumulation needs no `no_sync` (nothing is reduced until the step); gradient checkpointing
    needs none of DDP's static-graph settings; the checkpoints keep the model's own state-dict
    names. The cost: DDP overlaps its all-reduce with the backward pass, this reduces after it
    (about one all-reduce of the trainable weights per step, small beside a ViT's backward on
    one machine's GPUs). Like DDP, the model's state is broadcast from rank 0 at the start, and
    its buffers (BatchNorm statistics) after every step."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        cfg: Optimisation,
        steps_per_epoch: int,
        checkpoints: Path,
        device: torch.device | str = "cpu",
        progress: bool = True,
        train_mode: Callable[[torch.nn.Module], None] | None = None,
    ):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        # A last partial accumulation still steps.
        self.steps_per_epoch = max(1, math.ceil(steps_per_epoch / cfg.accumulate))
        self.total = cfg.epochs * self.steps_per_epoch
        opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total, cfg.warmup_steps)
        )
        self.dtype = runtime.amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.checkpoints = Path(checkpoints)
        self.progress = progress
        # What "training mode" means: the whole model by default; the student keeps its frozen
        # text tower in eval mode.
        self.train_mode = train_mode or (lambda m: m.train())
        self.history: list[dict] = []
        self.steps: list[dict] = []  # per optimiser step: the loss terms and the learning rate
        self.ctx = distributed.current()
        distributed.broadcast_state(self.model)  # one process: nothing

    def _autocast(self):
        return runtime.autocast(self.device, self.dtype)

    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "steps": self.steps,
            "optimisation": asdict(self.cfg),
        }

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch}.pt"

    def resume(self) -> int:
        """Load the latest epoch checkpoint, if any; returns the number of epochs already done.
        Several processes: the latest that rank 0 finds, loaded by every rank."""
        done = sorted(
            int(p.stem.split("-")[1])
            for p in self.checkpoints.glob("epoch-*.pt")
            if p.stem.split("-")[1].isdigit()
        )
        latest = distributed.broadcast_int(done[-1] if done else 0)
        if not latest:
            return 0
        path = self.checkpoint_path(latest)
        if not path.is_file():
            raise InputError(
                f"{path}: rank {self.ctx.rank} does not see the checkpoint that rank 0 resumes from: "
                "the checkpoints (runtime.scratch) must be in a folder every process sees"
            )
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["optimisation"] != asdict(self.cfg):
            raise ValueError(f"{path}: written with other settings; delete it to restart")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.steps = state["steps"]
        return state["epoch"]

    def fit(
        self,
        data: Callable[[int], Iterable[Any]],
        loss_fn: LossFn,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        on_epoch: Callable[[int], dict[str, float]] | None = None,
    ) -> list[dict]:
        """Run the remaining epochs. `data(epoch)` must depend only on the epoch (seeded order);
        `on_epoch(epoch)` returns validation metrics, stored in the history and checkpoint.
        Several processes: `data(epoch)` yields this rank's share of each global batch (the same
        number of batches on every rank), the recorded loss terms are their mean over the ranks
        (the global batch's, when `loss_fn` gathers), and `on_step`/`on_epoch` run on every rank."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        start = self.resume()
        for epoch in range(start + 1, self.cfg.epochs + 1):
            # dropout etc.: fixed by the epoch (and the rank)
            torch.manual_seed(self.cfg.seed * 1_000_003 + epoch + self.ctx.rank * RANK_SEED_STRIDE)
            self.train_mode(self.model)
            sums: dict[str, float] = {}
            n = 0
            bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {epoch}",
                disable=not (self.progress and self.ctx.is_main),
                leave=False,
            )
            self.opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(data(epoch)):
                with self._autocast():
                    terms = loss_fn(batch)
                self.scaler.scale(terms["total"] / self.cfg.accumulate).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n += 1
                if (i + 1) % self.cfg.accumulate == 0:
                    lr = self._lr()  # the rate this step used
                    self._step()
                    bar.update()
                    terms_now = {k: float(v.detach()) for k, v in terms.items()}
                    record = distributed.mean_over_ranks(terms_now) | {"lr": lr}
                    self.steps.append({"step": self.sched.last_epoch, "epoch": epoch, **record})
                    if on_step is not None:
                        on_step(self.sched.last_epoch, record)
            if n % self.cfg.accumulate:  # a last partial accumulation still steps
                self._step()
            bar.close()
            self.model.eval()
            sums = distributed.mean_over_ranks(sums)
            record = {"epoch": epoch, **{f"train_{k}": v / max(1, n) for k, v in sums.items()}}
            if on_epoch is not None:
                record.update(on_epoch(epoch))
            self.history.append(record)
            if self.ctx.is_main:
                atomic_torch_save(self.state(epoch), self.checkpoint_path(epoch))
            distributed.barrier()  # the others go on once the checkpoint is whole
        return self.history

    def _lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def _step(self) -> None:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        distributed.average_gradients(params)  # one process: nothing
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        distributed.broadcast_state(self.model, buffers_only=True)  # one process: nothing
