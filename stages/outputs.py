"""What every stage does with its inputs and outputs: upstream outputs checked, metrics JSON written
atomically, DVCLive curves, and the scratch folders of earlier runs cleared away."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import records
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


METRICS_DIR = Path("metrics")  # figures: metrics files; their info (counts, sizes, hashes,
# timings) in info/ below it, as cached outputs (pipeline/records.py says why)


def info_path(name: str, metrics_dir: Path = METRICS_DIR) -> Path:
    """Where a stage (or an evaluated model) keeps its info: metrics/info/<name>.json."""
    return metrics_dir / "info" / f"{name}.json"


def write_record(
    metrics_dir: Path, name: str, record: dict, info_keys: frozenset[str], sort_keys: bool = True
) -> dict:
    """The figures of `record` to <metrics_dir>/<name>.json, the rest to its info file; returns
    the figures. `sort_keys=False` keeps the record's own order (evaluate's: the data sets as
    evaluate.datasets lists them, which the report follows)."""
    figures, info = records.split(record, info_keys)
    write_json(metrics_dir / f"{name}.json", figures, sort_keys=sort_keys)
    write_json(info_path(name, metrics_dir), info, sort_keys=sort_keys)
    return figures


def read_record(metrics_dir: Path, name: str) -> dict:
    """A record `write_record` split, whole again (its figures alone where the info is absent)."""
    figures = json.loads((metrics_dir / f"{name}.json").read_text())
    info = info_path(name, metrics_dir)
    return records.merge(figures, json.loads(info.read_text())) if info.is_file() else figures


def log_live(folder: Path, records: list[dict], skip: tuple[str, ...] = ("step", "epoch")) -> None:
    """One DVCLive step per record, every other numeric field a curve for `dvc plots`. Written
    from a finished run's record, so a resumed run logs exactly what an uninterrupted one does."""
    shutil.rmtree(folder, ignore_errors=True)
    with _live(folder) as live:
        for record in records:
            _log(live, record, skip)
    _drop_summary(folder)


class LiveCurves:
    """DVCLive curves written while training runs, a step per record, so that `dvc plots show`
    (or DVC Studio) follows a run in progress; `finish` writes them again from the run's whole
    record (log_live), so that a resumed run ends with exactly the files of an uninterrupted one."""

    def __init__(self, folder: Path, skip: tuple[str, ...] = ("step", "epoch")):
        self.folder, self.skip = folder, skip
        self._live: Any = None

    def log(self, record: dict) -> None:
        if self._live is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._live = _live(self.folder)
        _log(self._live, record, self.skip)

    def finish(self, records: list[dict]) -> None:
        if self._live is not None:
            self._live.end()
            self._live = None
        log_live(self.folder, records, self.skip)


def _live(folder: Path) -> Any:
    from dvclive import Live

    return Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None)


def _log(live: Any, record: dict, skip: tuple[str, ...]) -> None:
    for name, value in record.items():
        if name not in skip:
            live.log_metric(name, value, plot=True)
    live.next_step()


def _drop_summary(folder: Path) -> None:
    # DVCLive's summary repeats the stage's own metrics file; left undeclared in dvc.yaml, it would
    # go stale when DVC restores the stage from its run-cache.
    (folder / "metrics.json").unlink(missing_ok=True)


def prune_runs(scratch: Path, keep: str) -> None:
    """Remove the checkpoint folders of other runs; the finished run's own stay."""
    if scratch.is_dir():
        for d in scratch.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d)
