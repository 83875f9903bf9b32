"""`dclip config list` / `dclip config use NAME`: switch params.yaml to a recipe from configs/.

A recipe is a whole params file (configs/<name>.yaml). `use` validates it as params.yaml would be
validated (relative paths against the project root), refuses to overwrite a params.yaml with
uncommitted changes unless forced, and then copies the recipe over params.yaml byte for byte, so
that `git diff params.yaml` shows exactly the recipe and `git checkout params.yaml` undoes it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import parse_params, read_yaml
from pipeline.errors import ParamsError


class RecipeError(ParamsError):
    """A recipe that cannot be used; the message says why and what to do."""


class UncommittedError(RecipeError):
    """params.yaml has changes that switching would lose."""

    exit_code = 1


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    title: str  # the file's first comment line


def configs_dir(params_file: Path) -> Path:
    return params_file.parent / "configs"


def available(params_file: Path = Path("params.yaml")) -> list[Recipe]:
    """The recipes in configs/ beside params_file, by name."""
    recipes = []
    for path in sorted(configs_dir(params_file).glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        title = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
        recipes.append(Recipe(path.stem, path, title))
    return recipes


def find(name: str, params_file: Path = Path("params.yaml")) -> Recipe:
    name = name.removesuffix(".yaml")
    recipes = available(params_file)
    for recipe in recipes:
        if recipe.name == name:
            return recipe
    names = ", ".join(r.name for r in recipes) or f"none: {configs_dir(params_file)} holds no *.yaml"
    raise RecipeError(f"unknown config {name!r}; available: {names}")


def validate(recipe: Recipe, params_file: Path) -> None:
    """Validate the recipe as it will be read once it is params_file (paths against its folder)."""
    try:
        raw = read_yaml(recipe.path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{recipe.path}: not valid YAML: {err}") from None
    try:
        parse_params(raw, source=str(recipe.path), base_dir=params_file.parent)
    except ParamsError as err:
        raise RecipeError(str(err)) from None


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def uncommitted(params_file: Path) -> bool:
    """Whether params_file differs from the last commit (staged or not), or is not committed at all.
    Outside a git repository (or without git) there is nothing to compare with: False."""
    root, name = params_file.parent, params_file.name
    try:
        inside = _git(["rev-parse", "--is-inside-work-tree"], root)
    except FileNotFoundError:  # no git at all: nothing to protect
        return False
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return False
    if not params_file.exists():
        return False
    if _git(["ls-files", "--error-unmatch", "--", name], root).returncode != 0:
        return True  # untracked: git could not bring it back
    if _git(["rev-parse", "--verify", "--quiet", "HEAD"], root).returncode != 0:
        return True  # added but never committed
    diff = _git(["diff", "--quiet", "HEAD", "--", name], root)
    if diff.returncode not in (0, 1):
        raise RecipeError(f"git diff on {params_file} failed: {diff.stderr.strip()}")
    return diff.returncode == 1


def use(name: str, params_file: Path = Path("params.yaml"), force: bool = False) -> Recipe:
    """Copy configs/<name>.yaml over params_file after validating it. Refuses, unless `force`,
    when params_file has uncommitted changes (other than being another recipe byte for byte).
    Returns the recipe used."""
    recipe = find(name, params_file)
    validate(recipe, params_file)
    data = recipe.path.read_bytes()
    current = params_file.read_bytes() if params_file.exists() else None
    if current == data:
        return recipe
    # A params file that is some recipe byte for byte loses nothing when replaced.
    is_recipe = any(r.path.read_bytes() == current for r in available(params_file))
    if not force and not is_recipe and uncommitted(params_file):
        raise UncommittedError(
            f"{params_file} has uncommitted changes that `config use` would overwrite; commit them "
            f"(or `git stash` them), or pass --force to discard them"
        )
    tmp = params_file.with_name(f".{params_file.name}.tmp-{os.getpid()}")
    shutil.copyfile(recipe.path, tmp)
    os.replace(tmp, params_file)
    return recipe
