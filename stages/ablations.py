"""`dclip ablations run|list` and `dclip report --ablations`: the paper's ablations and this
project's variants (pipeline/ablations.py) as DVC experiments over seeds, and the study table with
intervals from their per-query outcomes.

Each (variant, seed) is one `dvc exp run --temp -n <name>-s<seed> -S key=value …` on the whole
pipeline: DVC re-runs only the stages whose params the overrides touch (train_teacher, distill,
evaluate@student, report) and restores the rest from its cache, in a temporary directory, so the
workspace is never touched. The workspace's own run is `full` with its seed when its params are
those of `full` (then that run is not repeated). `--temp`, not `--queue` + `dvc queue start`: the
runs go one after another in the foreground, each one's output and exit status seen as it ends;
a queue's parallel workers would only compete for the one CPU or GPU each stage already fills,
and its failures surface later in `dvc queue logs`, from a background worker left running.
(`dclip ablations run --dry-run` prints the commands, for whoever wants to queue them.)

The table comes from the experiments of the workspace's baseline commit (`dvc exp show --json`):
an experiment named `<variant>-s<seed>` gives that run, its per-query outcomes read from its own git
commit (metrics/queries/student.parquet, a git-tracked output of evaluate@student); the workspace
gives the base CLIP (metrics/queries/base.parquet) and its own `full` run.
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

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from pipeline.ablations import (
    ABLATIONS,
    FULL,
    REFERENCE,
    SEED_KEYS,
    get_dotted,
    mismatches,
    overrides,
    parse_run_name,
    resolve,
    run_name,
    study_table,
    to_markdown,
)
from pipeline.config import load_params, read_yaml
from pipeline.errors import DclipError, UsageError
from stages.outputs import write_json

QUERIES = "metrics/queries/student.parquet"  # the evaluate@student output of every run
BASE_QUERIES = "metrics/queries/base.parquet"
PARAMS = "params.yaml"
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")
_HYDRA_WORDS = {"true", "false", "null", "nan", "inf"}


class AblationError(DclipError, RuntimeError):
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


def exp_run_command(name: str, seed: int) -> list[str]:
    """The target is dvc.yaml (its stages and whatever they depend on): on a paper run, the demo
    world's stage, which nothing there depends on, stays out, as with `dvc repro dvc.yaml`."""
    run = run_name(name, seed)
    return ["dvc", "exp", "run", "--temp", "-n", run, *set_param_args(overrides(name, seed)), "dvc.yaml"]


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


def experiments(states: list[Mapping]) -> tuple[Mapping, str | None, dict[str, Mapping]]:
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


def _git_show(root: Path, ref: str, path: str) -> bytes | None:
    out = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True)
    return out.stdout if out.returncode == 0 else None


def _read_queries(data: bytes | None) -> pa.Table | None:
    # An Arrow buffer, read on this thread: a Python file object (io.BytesIO) handed to Arrow's
    # thread pool could abort the interpreter at exit ("terminate called without an active
    # exception", exit 134; apache/arrow#34314, #50482): seen once in CI on a command that had
    # finished its work.
    return None if data is None else pq.read_table(pa.BufferReader(data), use_threads=False)


def workspace_seed(params: Mapping) -> int | None:
    """The seed of the workspace's run if its params are those of `full` with that seed."""
    try:
        seeds = {get_dotted(params, key) for key in SEED_KEYS}
    except KeyError:
        return None
    if len(seeds) != 1:
        return None
    seed = seeds.pop()
    return seed if isinstance(seed, int) and not mismatches(FULL, params, seed) else None


def _baseline_file(root: Path, rev: str | None, path: str) -> bytes | None:
    """A file of the workspace (rev None) or of commit `rev`."""
    if rev is None:
        return (root / path).read_bytes() if (root / path).is_file() else None
    return _git_show(root, rev, path)


def collect(
    root: Path = Path("."), rev: str | None = None
) -> tuple[dict, dict, str | None, dict[tuple[str, int], str]]:
    """({variant: {seed: queries table}}, {variant: {seed: params}}, baseline commit,
    {(variant, seed): experiment ref}) from the experiments of baseline `rev` (None: HEAD), with the
    base CLIP's and `full`'s own run from the workspace (rev None) or from that commit."""
    out = _dvc(["exp", "show", "--json", *(["--rev", rev] if rev else [])], root, capture=True)
    if out.returncode != 0:
        raise AblationError(f"`dvc exp show --json` failed in {root}:\n{out.stderr.strip()}")
    _, baseline, found = experiments(json.loads(out.stdout))
    source = baseline if rev else None
    queries: dict[str, dict[int, pa.Table]] = {}
    params: dict[str, dict[int, Mapping]] = {}
    base = _read_queries(_baseline_file(root, source, BASE_QUERIES))
    if base is not None:
        queries[REFERENCE] = {0: base}
    raw = _baseline_file(root, source, PARAMS)
    ws_params = (read_yaml(raw) if raw else None) or {}
    ws_seed = workspace_seed(ws_params)
    full = _read_queries(_baseline_file(root, source, QUERIES))
    if ws_seed is not None and full is not None:
        queries.setdefault(FULL, {})[ws_seed] = full
        params.setdefault(FULL, {})[ws_seed] = ws_params
    refs: dict[tuple[str, int], str] = {}
    for exp_name, state in found.items():
        parsed = parse_run_name(exp_name)
        if parsed is None or baseline is None:
            continue
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{exp_name}"
        refs[parsed] = ref
        table = _read_queries(_git_show(root, ref, QUERIES))
        if table is not None:
            name, seed = parsed
            queries.setdefault(name, {})[seed] = table
            params.setdefault(name, {})[seed] = _file_data(state, "params", PARAMS) or {}
    return queries, params, baseline, refs


# --- commands -------------------------------------------------------------------------------------


def planned(names: list[str] | None, seeds: int, root: Path) -> list[tuple[str, int]]:
    """(variant, seed) runs to make: every named variant (default: all) with seeds 0 … seeds-1,
    less the workspace's own run."""
    ws = read_yaml((root / PARAMS).read_text()) if (root / PARAMS).is_file() else {}
    ws_seed = workspace_seed(ws or {})
    return [
        (a.name, seed)
        for a in resolve(names)
        for seed in range(seeds)
        if not (a.name == FULL and seed == ws_seed)
    ]


def untracked_inputs(root: Path) -> list[tuple[str, Path]]:
    """(params key, path) of each raw input the params name that `dvc exp run --temp` would not
    find: it runs in a copy of the repository that holds what git tracks and what DVC checks out
    (a `dvc add`ed or imported folder, a stage's output such as the demo world), nothing else. An
    input that does not exist is left to `dclip params check`."""
    from dvc.repo import Repo

    from pipeline.curate import SourcePaths  # the readers' paths; imported only for this check

    params = load_params(root / PARAMS, only=("sources", "curate"))
    paths = SourcePaths.resolve(params.sources, root, params.curate.mix)
    present = [(k, p) for k, p in paths.named() if p.exists()]
    with Repo(str(root)) as repo:
        outs = [Path(str(out.fs_path)).resolve() for out in repo.index.outs]
    untracked = []
    for key, path in present:
        real = path.resolve()
        if any(real == out or out in real.parents for out in outs):
            continue
        listed = subprocess.run(
            ["git", "ls-files", "--", str(real)], cwd=root, capture_output=True, text=True, check=False
        )
        if not listed.stdout.strip():
            untracked.append((key, path))
    return untracked


def check_tracked(root: Path) -> None:
    """Refuse, before any experiment starts, raw inputs an experiment's copy would lack."""
    untracked = untracked_inputs(root)
    if not untracked:
        return
    lines = "\n".join(f"  {key}: {path}" for key, path in untracked)
    folders = " ".join(sorted({shlex.quote(os.path.relpath(path, root)) for _, path in untracked}))
    raise AblationError(
        f"{len(untracked)} raw input(s) are neither DVC-tracked nor in git, and `dvc exp run --temp` "
        f"runs in a copy of the repository that holds only tracked files:\n{lines}\n"
        f"Track them once (`dvc add {folders}`, or `dvc import-url URL PATH` where the team keeps "
        "the data), commit the .dvc files, and let experiments link the data instead of copying "
        "it: `dvc config cache.type reflink,hardlink,symlink` (docs/real-data.md)."
    )


def run(
    names: list[str] | None = None,
    seeds: int = 1,
    root: Path = Path("."),
    skip_existing: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Run the named variants (default: all) with seeds 0 … seeds-1 as DVC experiments, one after
    another. One already made for this baseline is replaced (DVC's run-cache makes an unchanged
    rerun cheap) unless skip_existing. A failed run does not stop the others; the failures are
    raised together at the end."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    chosen = planned(names, seeds, root)
    if dry_run:
        for name, seed in chosen:
            typer.echo(shlex.join(exp_run_command(name, seed)))
        return []
    check_tracked(root)
    _, _, _, refs = collect(root)
    done: list[str] = []
    failed: list[str] = []
    for name, seed in chosen:
        label = run_name(name, seed)
        if (name, seed) in refs:
            if skip_existing:
                typer.echo(f"{label}: already run for this commit; skipped")
                continue
            removed = _dvc(["exp", "remove", refs[(name, seed)]], root, capture=True)
            if removed.returncode != 0:
                raise AblationError(f"could not replace experiment {label}:\n{removed.stderr.strip()}")
        cmd = exp_run_command(name, seed)
        typer.echo(f"$ {shlex.join(cmd)}")
        result = _dvc(cmd[1:], root, capture=False)
        (done if result.returncode == 0 else failed).append(label)
        if result.returncode != 0:
            typer.echo(f"{label}: failed (exit {result.returncode}); going on with the rest", err=True)
    if failed:
        raise AblationError(
            f"run(s) failed: {', '.join(failed)} (done: {', '.join(done) or 'none'}); rerun them with "
            "`dclip ablations run NAME --seeds N --skip-existing`"
        )
    return done


def report(
    names: list[str] | None = None,
    out_dir: Path = Path("metrics"),
    root: Path = Path("."),
    seeds: int = 1,
    rev: str | None = None,
) -> dict:
    """metrics/ablations.json and metrics/ablations.md from the runs found (of baseline `rev`;
    None: HEAD and the workspace)."""
    queries, params, baseline, _ = collect(root, rev)
    t = study_table(queries, names or None, params, baseline, seeds_asked=seeds)
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
        how = shlex.join(exp_run_command(a.name, 0))
        extra = "" if a.paper else "  [not in the paper]"
        lines.append(f"{a.name:<20} {a.label}{extra}\n{'':<20} {how}")
    return "\n".join(lines)
