"""What every stage does with its inputs and outputs: upstream outputs checked, metrics JSON written
atomically, DVCLive curves, and the scratch folders of earlier runs cleared away."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import MissingOutput
from pipeline.files import atomic_file


def require(params_file: Path, outputs: Iterable[tuple[Path, str]]) -> None:
    """Each (path, stage) is an output of an earlier stage that this one reads; when any is
    missing, the pipeline state is at fault (not the params): say which stage to run."""
    missing = [(path, stage) for path, stage in outputs if not path.exists()]
    if missing:
        raise MissingOutput(
            f"{params_file}: "
            + "; ".join(f"{path} does not exist; run the {stage} stage first" for path, stage in missing)
        )


def write_json(path: Path, obj: dict, sort_keys: bool = False) -> None:
    """Atomically: a metrics file is never half written."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def log_live(folder: Path, records: list[dict], skip: tuple[str, ...] = ("step", "epoch")) -> None:
    """One DVCLive step per record, every other numeric field a curve for `dvc plots`. Written
    from a finished run's record, so a resumed run logs exactly what an uninterrupted one does."""
    from dvclive import Live

    shutil.rmtree(folder, ignore_errors=True)
    with Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for record in records:
            for name, value in record.items():
                if name not in skip:
                    live.log_metric(name, value, plot=True)
            live.next_step()
    # DVCLive's summary repeats the stage's own metrics file; left undeclared in dvc.yaml, it would
    # go stale when DVC restores the stage from its run-cache.
    (folder / "metrics.json").unlink(missing_ok=True)


def prune_runs(scratch: Path, keep: str) -> None:
    """Remove the checkpoint folders of other runs; the finished run's own stay."""
    if scratch.is_dir():
        for d in scratch.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d)
