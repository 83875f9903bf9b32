"""DVC re-runs a stage when one of its `deps` changes, so every stage in dvc.yaml and demo/dvc.yaml
must list, under `deps`, exactly the project code it runs and the package files that code reads:

- a missing file means an edit to it leaves a stale output that looks current;
- a file listed that the stage never runs re-runs the stage (and all after it) for nothing.

The code a stage runs is derived from the code itself, with `ast` alone (nothing is imported): the
stage's `dclip <command>` is found in stages/cli.py; what that command imports (inside its function
too: the stage modules are imported lazily), and what stages/cli.py imports at its top, is followed
through every in-project module it imports, at any depth and in function bodies too. Besides the
modules, a module counts the files it reads through `Path(__file__)` (pipeline/models/clip.py reads
the open_clip configs in pipeline/models/configs/). Third-party packages do not count: the
environment is pinned by constraints.txt.

What counts, precisely:
- a module imported by name, and each package `__init__.py` on its way (`import pipeline.models.clip`
  runs pipeline/models/__init__.py); `from pipeline.sources import X` also the submodule X if X is
  one; relative imports likewise;
- not what runs only under `if TYPE_CHECKING:`, and not an `__init__.py` that holds nothing but a
  docstring (it cannot change what a stage does: it is neither required nor surplus);
- in a command's own function, not a branch taken only under a boolean flag the stage's command
  line does not pass (`dclip report` takes its `--ablations` branch only when asked);
- stages/cli.py itself is not a dep: it is the dispatcher that all commands share, and listing it
  would re-run the whole pipeline, detect and embed included, for a new utility command or an edited
  help text. What it runs for a stage is counted, so a command function must stay argument passing:
  stage logic belongs in stages/<module>.py.

A folder listed as a dep covers every file under it (DVC ignores __pycache__/ and *.pyc, see
.dvcignore), so every file under it must be needed. The message of a failing stage names the files
and gives the stage's code deps exactly, whole folders where the stage needs all of one.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
DVC_FILES = ("dvc.yaml", "demo/dvc.yaml")
CLI = "stages/cli.py"


# --- the project's files and modules --------------------------------------------------------------


@cache
def package_files(root: Path) -> frozenset[str]:
    """Every file DVC would hash under the project's packages (repo-relative posix paths)."""
    return frozenset(
        p.relative_to(root).as_posix()
        for package in PACKAGES
        for p in (root / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def inert(root: Path, file: str) -> bool:
    """An `__init__.py` with nothing but a docstring: importing it runs nothing."""
    if not file.endswith("__init__.py"):
        return False
    body = parse(root / file).body
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body)


def module_name(file: str) -> str:
    parts = file.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(root: Path, name: str) -> str | None:
    """The file of an in-project module (`pipeline.sources` → pipeline/sources/__init__.py)."""
    base = "/".join(name.split("."))
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def files_of(root: Path, name: str) -> list[str]:
    """What importing a module runs: each package `__init__.py` on its way, then the module (a
    folder without `__init__.py` is a namespace package: it runs nothing)."""
    parts, files = name.split("."), []
    for i in range(1, len(parts) + 1):
        if file := module_file(root, ".".join(parts[:i])):
            files.append(file)
        elif not (root / "/".join(parts[:i])).is_dir():
            raise LookupError(name)
    return files


# --- what a piece of code imports and reads -------------------------------------------------------

Branches = Callable[[ast.If], tuple[bool, bool]]


def type_checking_only(node: ast.If) -> tuple[bool, bool]:
    """(run the body?, run the else?) of an `if`: never the body of `if TYPE_CHECKING:`."""
    test = node.test
    name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
    return (name != "TYPE_CHECKING", True)


def walk(nodes: Iterable[ast.AST], branches: Branches = type_checking_only) -> Iterator[ast.AST]:
    """`ast.walk`, but into only the branches of each `if` that `branches` says can run."""
    for node in nodes:
        yield node
        if isinstance(node, ast.If):
            body, orelse = branches(node)
            children = [node.test, *(node.body if body else []), *(node.orelse if orelse else [])]
        else:
            children = list(ast.iter_child_nodes(node))
        yield from walk(children, branches)


def imported(nodes: Iterable[ast.AST], file: str) -> Iterator[tuple[str, str | None]]:
    """(module, name imported from it) for every import among the nodes; relative ones resolved."""
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(file).split(".")
                if not file.endswith("__init__.py"):
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                yield base, alias.name


def static_path(node: ast.AST, file: Path) -> tuple[Path, ast.AST | None] | None:
    """The path an expression built from `Path(__file__)` names, if the code alone fixes it, and the
    expression it extends (`.parent`, `.parents[i]`, `.resolve()`, `/ "name"`)."""
    match node:
        case ast.Call(func=ast.Name(id="Path"), args=[ast.Name(id="__file__")]):
            return file, None
        case ast.Attribute(attr="parent", value=base):
            step = lambda p: p.parent  # noqa: E731
        case ast.Subscript(value=ast.Attribute(attr="parents", value=base), slice=ast.Constant(value=int(i))):
            step = lambda p: p.parents[i]  # noqa: E731
        case ast.Call(func=ast.Attribute(attr="resolve", value=base), args=[]):
            step = lambda p: p  # noqa: E731
        case ast.BinOp(op=ast.Div(), left=base, right=ast.Constant(value=str(name))):
            step = lambda p: p / name  # noqa: E731
        case _:
            return None
    found = static_path(base, file)
    return (step(found[0]), base) if found else None


def files_read(nodes: Iterable[ast.AST], root: Path, file: str) -> set[str]:
    """Project files that code reads by a path made from `Path(__file__)`: a file, every file under a
    folder, or the matches of `.glob(pattern)` / `.rglob(pattern)` on one."""
    paths, inner, found = {}, set(), set()
    nodes = list(nodes)
    for node in nodes:
        if (static := static_path(node, root / file)) is not None:
            paths[id(node)] = static[0]
            inner.add(id(static[1]))
    for node in nodes:
        match node:
            case ast.Call(
                func=ast.Attribute(attr="glob" | "rglob" as how, value=base),
                args=[ast.Constant(value=str(pat))],
            ) if id(base) in paths:
                inner.add(id(base))
                found |= set(getattr(paths[id(base)], how)(pat))
    for key, path in paths.items():
        if key not in inner:
            found |= set(path.rglob("*")) if path.is_dir() else {path}
    files = package_files(root)
    rels = {p.relative_to(root).as_posix() for p in found if p.is_relative_to(root)}
    return {rel for rel in rels if rel in files and rel != file}


# --- the code a stage runs ------------------------------------------------------------------------


@dataclass
class Needed:
    """Files a stage needs, each with the file that brought it in (None: the command itself)."""

    via: dict[str, str | None]
    unresolved: list[str]


def follow(root: Path, start: Iterable[tuple[str, str | None]], reads: set[str]) -> Needed:
    """Everything the imports `start` run, at any depth, and the files that code reads."""
    via: dict[str, str | None] = dict.fromkeys(reads)
    unresolved: list[str] = []
    queue: list[tuple[str, str | None, str | None]] = [(m, n, None) for m, n in start]
    while queue:
        module, name, importer = queue.pop()
        if module.split(".")[0] not in PACKAGES:
            continue  # third-party or the standard library
        try:
            new = files_of(root, module)
        except LookupError:
            unresolved.append(f"{importer or CLI} imports {module}, which is not in the tree")
            continue
        if name and module_file(root, f"{module}.{name}"):
            new.append(module_file(root, f"{module}.{name}"))
        for file in new:
            if file in via:
                continue
            via[file] = importer
            nodes = list(walk([parse(root / file)]))
            queue += [(m, n, file) for m, n in imported(nodes, file)]
            for data in files_read(nodes, root, file):
                via.setdefault(data, file)
    return Needed({f: v for f, v in via.items() if not inert(root, f)}, unresolved)


@dataclass
class Cli:
    tree: ast.Module
    commands: dict[tuple[str, ...], ast.FunctionDef]  # `dclip a b` → ("a", "b") → its function
    functions: dict[str, ast.FunctionDef]  # every top-level function, for helpers the commands call


def read_cli(root: Path) -> Cli:
    """The typer commands of stages/cli.py. A command is registered on a Typer by a decorator,
    `@<typer>.command(name)` or a project wrapper `@<wrapper>(<typer>, name)`; sub-apps by
    `app.add_typer(sub, name=…)`; a command's default name is its function's, `_` → `-`."""
    tree = parse(root / CLI)
    typers, parent = set(), {}
    for node in ast.walk(tree):
        match node:
            case ast.Assign(targets=[ast.Name(id=var)], value=ast.Call(func=ast.Attribute(attr="Typer"))):
                typers.add(var)
            case ast.Call(
                func=ast.Attribute(attr="add_typer", value=ast.Name(id=app)), args=[ast.Name(id=sub)]
            ):
                parent[sub] = (app, next(k.value.value for k in node.keywords if k.arg == "name"))

    def prefix(app: str) -> tuple[str, ...]:
        return (*prefix(parent[app][0]), parent[app][1]) if app in parent else ()

    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    commands = {}
    for function in functions.values():
        for dec in function.decorator_list:
            match dec:
                case ast.Call(func=ast.Attribute(attr="command", value=ast.Name(id=app)), args=rest) if (
                    app in typers
                ):
                    pass
                case ast.Call(args=[ast.Name(id=app), *rest]) if app in typers:
                    pass
                case _:
                    continue
            names = [a.value for a in rest] + [k.value.value for k in dec.keywords if k.arg == "name"]
            name = names[0] if names and names[0] else function.name.replace("_", "-")
            commands[(*prefix(app), name)] = function
    return Cli(tree, commands, functions)


def command_of(cmd: str, cli: Cli) -> tuple[tuple[str, ...] | None, list[str]]:
    """The command path a stage's `dclip …` command line runs (None if none) and its words."""
    words = shlex.split(cmd)
    if words[:1] != ["dclip"]:
        return None, words
    path: tuple[str, ...] = ()
    for word in words[1:]:
        if not any(p[: len(path) + 1] == (*path, word) for p in cli.commands):
            break
        path = (*path, word)
    return (path if path in cli.commands else None), words


def flags(function: ast.FunctionDef) -> dict[str, str]:
    """A command's boolean parameters → their `--flag` (typer's default or the one declared)."""
    out = {}
    for arg in function.args.args + function.args.kwonlyargs:
        ann = arg.annotation
        declared = []
        if isinstance(ann, ast.Subscript) and isinstance(ann.slice, ast.Tuple):
            ann, *meta = ann.slice.elts
            declared = [
                a.value.split("/")[0]
                for m in meta
                if isinstance(m, ast.Call)
                for a in m.args
                if isinstance(a, ast.Constant) and str(a.value).startswith("--")
            ]
        if isinstance(ann, ast.Name) and ann.id == "bool":
            out[arg.arg] = declared[0] if declared else "--" + arg.arg.replace("_", "-")
    return out


def needed_by(root: Path, cmd: str) -> Needed:
    """What `dclip …` runs: stages/cli.py's top-level imports, and its command function's imports
    (and those of the functions of stages/cli.py that it or its decorators call), followed at any
    depth."""
    cli = read_cli(root)
    path, words = command_of(cmd, cli)
    assert path, f"`{cmd}` is not a command of {CLI}"
    function = cli.commands[path]
    options = flags(function)

    def branches(node: ast.If) -> tuple[bool, bool]:
        if isinstance(node.test, ast.Name) and node.test.id in options:
            given = options[node.test.id] in words
            return given, not given
        return type_checking_only(node)

    top = [s for s in cli.tree.body if not isinstance(s, ast.FunctionDef | ast.ClassDef)]
    nodes, todo, seen = list(walk(top)), [function], set()
    while todo:
        f = todo.pop()
        seen.add(f.name)
        body = list(walk([*f.decorator_list, *f.body], branches if f is function else type_checking_only))
        nodes += body
        todo += [
            cli.functions[n.func.id]
            for n in body
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in cli.functions
            and n.func.id not in seen
        ]
    return follow(root, imported(nodes, CLI), files_read(nodes, root, CLI))


# --- what dvc.yaml lists --------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    dvc_file: str
    cmd: str
    code_deps: list[str]  # deps under the project's packages, repo-relative


def stages(root: Path) -> list[Stage]:
    """Every stage of the project's dvc.yaml files (a foreach/matrix stage once: all its entries run
    the same code), with its deps under pipeline/ or stages/ made relative to the repository."""
    out = []
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load((root / dvc_file).read_text())["stages"].items():
            body = stage.get("do", stage)
            wdir = (root / dvc_file).parent / body.get("wdir", stage.get("wdir", "."))
            code = []
            for dep in body.get("deps", []):
                if "${" in dep:
                    continue  # data paths from params
                rel = (wdir / dep).resolve().relative_to(root.resolve()).as_posix()  # `wdir: ..`
                if rel.split("/")[0] in PACKAGES:
                    code.append(rel)
            out.append(Stage(name, dvc_file, body["cmd"], code))
    return out


def covered(file: str, deps: Iterable[str]) -> bool:
    return any(file == d or file.startswith(d + "/") for d in deps)


def exact_deps(root: Path, needed: set[str]) -> list[str]:
    """The fewest entries that cover exactly the needed files: a folder where all of it is needed."""
    files = {f for f in package_files(root) if not inert(root, f)}
    folders = sorted({p.as_posix() for f in files for p in Path(f).parents if len(p.parts) > 1})
    whole = [d for d in folders if {f for f in files if covered(f, [d])} <= needed]
    whole = [d for d in whole if not covered(d, [w for w in whole if w != d])]  # outermost only
    return sorted(whole + [f for f in needed if not covered(f, whole)])


def problems(root: Path, stage: Stage) -> list[str]:
    needed = needed_by(root, stage.cmd)
    files = {f for f in package_files(root) if not inert(root, f)}
    stale = [d for d in stage.code_deps if not (root / d).exists()]
    missing = sorted(f for f in needed.via if not covered(f, stage.code_deps))
    surplus = sorted(f for f in files if covered(f, stage.code_deps) and f not in needed.via)
    if not (stale or missing or surplus or needed.unresolved):
        return []
    exact = exact_deps(root, set(needed.via))
    lines = [f"{stage.name} ({stage.dvc_file}, `{stage.cmd}`):"]
    lines += [f"  {u}" for u in needed.unresolved]
    lines += [f"  lists {d}, which does not exist" for d in stale]
    lines += [f"  runs or reads {f} (via {needed.via[f] or CLI}), which no dep covers" for f in missing]
    lines += [f"  lists {f}, which its code never runs or reads" for f in surplus]
    lines += [f"  add:    - {d}" for d in exact if d not in stage.code_deps]
    lines += [f"  remove: - {d}" for d in stage.code_deps if d not in exact]
    lines += ["  its code deps, exactly:"] + [f"      - {d}" for d in exact]
    return lines


# --- the tests ------------------------------------------------------------------------------------


def test_every_stage_command_is_a_dclip_command():
    cli = read_cli(REPO)
    unknown = [f"{s.name}: `{s.cmd}`" for s in stages(REPO) if command_of(s.cmd, cli)[0] is None]
    assert not unknown, f"stages whose command is no `dclip` command of {CLI}: {unknown}"


def test_every_stage_lists_exactly_the_code_it_runs_and_reads():
    report = [line for stage in stages(REPO) for line in problems(REPO, stage)]
    assert not report, "dvc.yaml code deps do not match the code:\n" + "\n".join(report)


# --- the derivation itself, on a small made-up project ------------------------------------------

TOY = {
    "stages/cli.py": """
        import typer
        from pipeline.config import Params
        app = typer.Typer()
        sub = typer.Typer()
        app.add_typer(sub, name="sub")

        def _helper():
            from pipeline import helper

        @app.command("go")
        def go(full: Annotated[bool, typer.Option("--full")] = False):
            from stages import go as stage
            _helper()
            if full:
                from pipeline import extra

        @sub.command()
        def do_it():
            from pipeline.pkg import thing
            from pipeline.ns import mod

        def command(group, name=None):
            from pipeline import wrapping
            return group.command(name)

        @command(sub)
        def via_wrapper():
            pass
    """,
    "stages/__init__.py": "",
    "stages/go.py": """
        from typing import TYPE_CHECKING
        from pipeline.pkg import Reader
        if TYPE_CHECKING:
            from pipeline import typing_only
        def run():
            from .local import x
    """,
    "stages/local.py": "",
    "pipeline/__init__.py": '"""Docstring only."""',
    "pipeline/config.py": "",
    "pipeline/helper.py": "",
    "pipeline/extra.py": "",
    "pipeline/typing_only.py": "",
    "pipeline/unused.py": "",
    "pipeline/wrapping.py": "",
    "pipeline/ns/mod.py": "",  # a namespace package: no __init__.py
    "pipeline/pkg/__init__.py": "from pipeline.pkg.reader import Reader",
    "pipeline/pkg/reader.py": """
        from pathlib import Path
        DATA = Path(__file__).parent / "data"
        CODE = sorted(Path(__file__).parent.parent.glob("h*.py"))
    """,
    "pipeline/pkg/thing.py": "",
    "pipeline/pkg/data/a.json": "{}",
    "pipeline/pkg/data/b.json": "{}",
}


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    import textwrap

    for name, text in TOY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def test_a_command_needs_its_imports_at_any_depth_lazy_relative_and_read_files(toy):
    assert set(needed_by(toy, "dclip go --params p.yaml").via) == {
        "pipeline/config.py",  # the cli's top
        "pipeline/helper.py",  # a cli helper the command calls, and read by a glob
        "stages/go.py",
        "stages/local.py",  # relative, inside a function
        "pipeline/pkg/__init__.py",
        "pipeline/pkg/reader.py",
        "pipeline/pkg/data/a.json",
        "pipeline/pkg/data/b.json",
    }
    assert "pipeline/extra.py" in needed_by(toy, "dclip go --full").via
    assert "pipeline/pkg/thing.py" in needed_by(toy, "dclip sub do-it").via
    assert set(needed_by(toy, "dclip sub via-wrapper").via) == {"pipeline/config.py", "pipeline/wrapping.py"}


def test_a_stage_that_lists_too_little_too_much_or_a_moved_file_fails_with_the_lines_to_write(toy):
    right = ["pipeline/config.py", "pipeline/helper.py", "pipeline/pkg/__init__.py", "pipeline/pkg/data"]
    right += ["pipeline/pkg/reader.py", "stages/go.py", "stages/local.py"]
    assert problems(toy, Stage("go", "dvc.yaml", "dclip go", right)) == []
    wrong = ["pipeline/config.py", "pipeline/helper.py", "pipeline/pkg/reader.py", "pipeline/gone.py"]
    wrong += ["stages/go.py", "stages/local.py", "pipeline/unused.py"]
    report = "\n".join(problems(toy, Stage("go", "dvc.yaml", "dclip go", wrong)))
    assert "lists pipeline/gone.py, which does not exist" in report
    assert "runs or reads pipeline/pkg/data/a.json (via pipeline/pkg/reader.py), which no dep" in report
    assert "lists pipeline/unused.py, which its code never runs or reads" in report
    assert "add:    - pipeline/pkg/__init__.py\n  add:    - pipeline/pkg/data\n" in report
    assert "remove: - pipeline/gone.py\n  remove: - pipeline/unused.py\n" in report
    assert report.endswith("\n".join(f"      - {d}" for d in right))


def test_a_folder_dep_where_the_stage_needs_all_of_it(toy):
    # `sub do-it` needs the whole of pipeline/pkg; a folder listed must hold nothing unneeded.
    assert exact_deps(toy, set(needed_by(toy, "dclip sub do-it").via)) == [
        "pipeline/config.py",
        "pipeline/helper.py",
        "pipeline/ns",
        "pipeline/pkg",
    ]
    assert "lists pipeline/pkg/thing.py, which its code never runs" in "\n".join(
        problems(toy, Stage("go", "dvc.yaml", "dclip go", ["pipeline/pkg"]))
    )
