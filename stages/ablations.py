"""`dclip ablations run|list` and `dclip report --ablations`: the paper's ablations
(pipeline/ablations.py) as DVC experiments, and their Table 4 from `dvc exp show`.

Each ablation is one `dvc exp run --temp -n <name> -S key=value …` on the whole pipeline: DVC
re-runs only the stages whose params the overrides touch (train_teacher, distill, evaluate@student,
report; distill onwards for no_teacher) and restores the rest from its cache, in a temporary
directory, so the workspace is never touched. `--temp`, not `--queue` + `dvc queue start`: the
runs go one after another in the foreground, each one's output and exit status seen as it ends;
a queue's parallel workers would only compete for the one CPU or GPU each stage already fills,
and its failures surface later in `dvc queue logs`, from a background worker left running.
(`dclip ablations run --dry-run` prints the commands, for whoever wants to queue them.)

The table's rows come from `dvc exp show --json` for the workspace's baseline commit: an
experiment named after an ablation gives that row (its metrics/student.json); the workspace gives
`full` (metrics/student.json) and the base CLIP (metrics/base.json).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from pipeline.ablations import ABLATIONS, BY_NAME, FULL, REFERENCE, overrides, resolve, table, to_markdown
from stages.outputs import write_json

METRICS = "metrics/student.json"  # the evaluate@student output of every run
BASE_METRICS = "metrics/base.json"
PARAMS = "params.yaml"
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")
_HYDRA_WORDS = {"true", "false", "null", "nan", "inf"}


class AblationError(RuntimeError):
    pass


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (what `dvc exp run -S` parses), read back as the same
    YAML value: booleans and null as words, numbers as such, a string quoted unless plainly a word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if text and set(text) <= _PLAIN and text.lower() not in _HYDRA_WORDS and not text[0].isdigit():
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_param_args(changes: Mapping[str, Any]) -> list[str]:
    return [arg for key, value in changes.items() for arg in ("-S", f"{key}={hydra_value(value)}")]


def exp_run_command(name: str) -> list[str]:
    """The target is dvc.yaml (its stages and whatever they depend on): on a paper run, the demo
    world's stage, which nothing there depends on, stays out, as with `dvc repro dvc.yaml`."""
    return ["dvc", "exp", "run", "--temp", "-n", name, *set_param_args(overrides(name)), "dvc.yaml"]


def _env() -> dict[str, str]:
    """This environment's tools first on PATH, so that the stages' `dclip` is this one."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _dvc(args: list[str], root: Path, capture: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), capture_output=capture, text=True
    )


# --- reading `dvc exp show --json` ----------------------------------------------------------------


def _file_data(state: Mapping, kind: str, path: str) -> dict | None:
    data = (state.get("data") or {}).get(kind) or {}
    entry = data.get(path) or {}
    return None if entry.get("error") else entry.get("data")


def experiments(states: list[Mapping]) -> tuple[dict, str | None, dict[str, Mapping]]:
    """From `dvc exp show --json`: the workspace's state, the baseline commit, and the finished
    experiments of that baseline by name (queued, running and failed ones are left out)."""
    workspace = next((s for s in states if s.get("rev") == "workspace"), {})
    base = next((s for s in states if s.get("rev") != "workspace"), None)
    found: dict[str, Mapping] = {}
    for exp_range in (base or {}).get("experiments") or []:
        executor = exp_range.get("executor") or {}
        revs = exp_range.get("revs") or []
        if executor.get("state") in ("queued", "running", "failed") or not revs:
            continue
        state = revs[0]
        name = exp_range.get("name") or state.get("name")
        if name and state.get("data") and not state.get("error"):
            found[name] = state
    return workspace, (base or {}).get("rev"), found


def collect(root: Path = Path(".")) -> tuple[dict, dict, str | None, dict[str, str]]:
    """({variant: metrics}, {variant: params}, baseline commit, {experiment name: its ref}) from
    the workspace and its baseline's experiments."""
    out = _dvc(["exp", "show", "--json"], root, capture=True)
    if out.returncode != 0:
        raise AblationError(f"`dvc exp show --json` failed in {root}:\n{out.stderr.strip()}")
    workspace, baseline, found = experiments(json.loads(out.stdout))
    results = {REFERENCE: _file_data(workspace, "metrics", BASE_METRICS)}
    results[FULL] = _file_data(workspace, "metrics", METRICS)
    params = {FULL: _file_data(workspace, "params", PARAMS) or {}}
    for name, state in found.items():
        if name in BY_NAME and name != FULL:  # the workspace is `full`
            results[name] = _file_data(state, "metrics", METRICS)
            params[name] = _file_data(state, "params", PARAMS) or {}
    refs = {name: f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}" for name in found} if baseline else {}
    return results, params, baseline, refs


# --- commands -------------------------------------------------------------------------------------


def run(
    names: list[str] | None = None, root: Path = Path("."), skip_existing: bool = False, dry_run: bool = False
) -> list[str]:
    """Run the named ablations (default: all but `full`, the workspace's own `dvc repro`)
    as DVC experiments, one after another. One already made for this baseline is replaced (DVC's
    run-cache makes an unchanged rerun cheap) unless skip_existing. A failed run does not stop the
    others; the failures are raised together at the end."""
    chosen = [a.name for a in resolve(names) if a.name != FULL]
    if names and FULL in names:
        typer.echo("full: the workspace's own run, not an experiment: `dvc repro dvc.yaml` makes it")
    if dry_run:
        for name in chosen:
            typer.echo(shlex.join(exp_run_command(name)))
        return []
    _, _, _, refs = collect(root)
    done, failed = [], []
    for name in chosen:
        if name in refs:
            if skip_existing:
                typer.echo(f"{name}: already run for this commit; skipped")
                continue
            removed = _dvc(["exp", "remove", refs[name]], root, capture=True)
            if removed.returncode != 0:
                raise AblationError(f"could not replace experiment {name}:\n{removed.stderr.strip()}")
        cmd = exp_run_command(name)
        typer.echo(f"$ {shlex.join(cmd)}")
        result = _dvc(cmd[1:], root, capture=False)
        (done if result.returncode == 0 else failed).append(name)
        if result.returncode != 0:
            typer.echo(f"{name}: failed (exit {result.returncode}); going on with the rest", err=True)
    if failed:
        raise AblationError(
            f"ablation(s) failed: {', '.join(failed)} (done: {', '.join(done) or 'none'}); "
            f"rerun with `dclip ablations run {' '.join(failed)}`"
        )
    return done


def report(names: list[str] | None = None, out_dir: Path = Path("metrics"), root: Path = Path(".")) -> dict:
    """metrics/ablations.json and metrics/ablations.md from the experiments found."""
    results, params, baseline, _ = collect(root)
    t = table(results, names or None, params, baseline)
    write_json(out_dir / "ablations.json", t)
    markdown = to_markdown(t)
    tmp = out_dir / f".ablations.md.tmp-{os.getpid()}"
    tmp.write_text(markdown, encoding="utf-8")
    os.replace(tmp, out_dir / "ablations.md")
    typer.echo(markdown, nl=False)
    if t["missing"]:
        typer.echo(f"missing: {', '.join(m['name'] for m in t['missing'])} (commands above)", err=True)
    return t


def describe() -> str:
    """Every ablation, its overrides and its command, one a line."""
    lines = []
    for a in ABLATIONS:
        how = "the workspace: dvc repro dvc.yaml" if a.name == FULL else shlex.join(exp_run_command(a.name))
        extra = "" if a.paper else "  [not in the paper]"
        lines.append(f"{a.name:<20} {a.label}{extra}\n{'':<20} {how}")
    return "\n".join(lines)
