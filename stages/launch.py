"""Data-parallel launch of the training stages (train_teacher, distill): with runtime.processes > 1
the stage runs itself again under torchrun on this machine and waits; inside torchrun or srun
(WORLD_SIZE set) it joins the run instead. The logic is pipeline/distributed.py's."""

from __future__ import annotations

from pathlib import Path

from pipeline import distributed


def command(name: str, params_file: Path) -> list[str]:
    """The stage's own command line, `dclip <name> --params <file>`, as python's arguments."""
    return ["-m", "stages.cli", name, "--params", str(params_file)]


def relaunched(params_file: Path, name: str, processes: int, batch_size: int, batch_param: str) -> bool:
    """True when `dclip <name>` ran through torchrun with `processes` processes and finished: the
    caller's work is done. False when this process does the work: runtime.processes is 1, or
    this process is already one of a launched run. A failed run exits with its exit code."""
    if not distributed.should_launch(processes):
        return False
    distributed.check_batch_size(batch_size, processes, batch_param)  # before starting anything
    code = distributed.launch(processes, command(name, params_file))
    if code:
        raise SystemExit(code)
    return True
