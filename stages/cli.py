"""`dclip`: every pipeline stage and utility as a command. Stage modules are imported lazily so
that `dclip --help` stays fast."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipeline.errors import DclipError

app = typer.Typer(help="dclip: Distill CLIP as a DVC pipeline.", no_args_is_help=True, add_completion=False)
params_app = typer.Typer(help="Inspect and validate params files.", no_args_is_help=True)
demo_app = typer.Typer(help="The offline demo: its world and its small models.", no_args_is_help=True)
app.add_typer(params_app, name="params")
app.add_typer(demo_app, name="demo")
config_app = typer.Typer(help="Paper recipes: params.yaml from a file in configs/.", no_args_is_help=True)
app.add_typer(config_app, name="config")
ablations_app = typer.Typer(
    help="The paper's ablations and the study's variants, over seeds, as DVC experiments.",
    no_args_is_help=True,
)
app.add_typer(ablations_app, name="ablations")

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="The params file to read.")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(
    group: typer.Typer, name: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose refusals (any DclipError) print one `error: …` line and exit with
    the error's code (2 params, 1 input, 3 a missing upstream output); anything else is a bug and
    keeps its traceback."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DclipError as err:
                _fail(str(err), err.exit_code)

        return group.command(name)(run)

    return register


@command(params_app, "check")
def params_check(file: Annotated[Path, typer.Argument(help="Params file.")] = Path("params.yaml")) -> None:
    """Validate a params file: every section, every key, the rules across sections, and every raw
    input it names (those the demo's world stage makes are left to it); exit 2 naming each fault.
    Its paths are relative to the project (the nearest folder up holding dvc.yaml), so that a
    recipe is checked where it lies: `dclip params check configs/paper-vit-b32.yaml`."""
    from pipeline.config import load_params
    from stages.curate import check_raw_inputs

    root = _project_root(file)
    check_raw_inputs(load_params(file, base_dir=root), file, made_by_world=True, root=root)
    typer.echo(f"{file}: ok")


def _project_root(file: Path) -> Path:
    """The nearest folder holding `file` with a dvc.yaml in it; else the file's own folder."""
    folder = file.resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return file.parent


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context) -> None:
    """`dvc repro` after the project's own check of params.yaml: every key, the rules across
    sections and every raw input it names, so that a missing dataset is named by its params key
    before DVC's one-path `[Errno 2]` can hide it. Every argument goes on to dvc repro
    (`dclip repro dvc.yaml`, `dclip repro -f curate`, …)."""
    import os
    import shutil

    from pipeline.config import load_params
    from stages.curate import check_raw_inputs

    params = Path("params.yaml")
    try:
        check_raw_inputs(load_params(params), params, made_by_world=True)
    except DclipError as err:
        _fail(str(err), err.exit_code)
    dvc = shutil.which("dvc")
    if dvc is None:
        _fail("dvc is not on PATH: activate the project's environment (`source .venv/bin/activate`)", 1)
    sys.stdout.flush()
    os.execv(dvc, [dvc, "repro", *ctx.args])  # DVC's own exit status and output, unchanged


@command(app)
def world(params: ParamsFile = Path("params.yaml")) -> None:
    """Stage `world`: generate the demo world's raw datasets in their real formats."""
    from stages import world as stage

    stage.run(params)


@command(app)
def export(params: ParamsFile = Path("params.yaml")) -> None:
    """Stage `export`: the student as a folder open_clip loads by itself (open_clip_config.json,
    open_clip_model.safetensors, a model card README.md) at export.out; load it with
    `open_clip.create_model_and_transforms("local-dir:FOLDER")`."""
    from stages import export as stage

    stage.run(params)


@command(app)
def weights(params: ParamsFile = Path("params.yaml")) -> None:
    """Stage `weights`: the CLIP and detector weights that params name (a local file, an open_clip
    tag or ultralytics release, or none) as clip.checkpoint and detector.checkpoint."""
    from stages import weights as stage

    stage.run(params)


@command(app)
def curate(
    params: ParamsFile = Path("params.yaml"),
    info: Annotated[Path, typer.Option(help="Where the stage's counts go (a JSON info file).")] = Path(
        "metrics/info/curate.json"
    ),
) -> None:
    """Stage `curate`: training shards from COCO, Flickr30k and CC with the Karpathy val/test
    images kept out; the Karpathy test sets and zero-shot sets as evaluation shards."""
    from stages import curate as stage

    stage.run(params, info)


@command(app)
def detect(
    params: ParamsFile = Path("params.yaml"),
    info: Annotated[Path, typer.Option(help="Where the stage's counts go (a JSON info file).")] = Path(
        "metrics/info/detect.json"
    ),
) -> None:
    """Stage `detect`: YOLO regions of every training image (resumable per shard)."""
    from stages import detect as stage

    stage.run(params, info)


@command(app)
def embed(
    params: ParamsFile = Path("params.yaml"),
    info: Annotated[Path, typer.Option(help="Where the stage's counts go (a JSON info file).")] = Path(
        "metrics/info/embed.json"
    ),
) -> None:
    """Stage `embed`: CLIP embeddings of every training pair (image, regions, caption, tokens,
    region weights) as Parquet tables and teacher-ready shards (resumable per shard)."""
    from stages import embed as stage

    stage.run(params, info)


@command(app, "train-teacher")
def train_teacher(params: ParamsFile = Path("params.yaml")) -> None:
    """Stage `train_teacher`: the cross-modal meta-teacher on the embed cache (resumable per
    epoch), then the teacher image embedding of every training pair."""
    from stages import train_teacher as stage

    stage.run(params)


@command(app)
def distill(params: ParamsFile = Path("params.yaml")) -> None:
    """Stage `distill`: the CLIP student — image tower fine-tuned toward the teacher targets, text
    tower frozen and checked by hash (resumable per epoch); models/student.pt."""
    from stages import distill as stage

    stage.run(params)


@command(app)
def evaluate(
    model: Annotated[str, typer.Option(help="The model's name: base, student, … (names its outputs).")] = (
        "base"
    ),
    weights: Annotated[
        str | None,
        typer.Option(help="Its checkpoint (a path or open_clip tag); default: clip.checkpoint for base."),
    ] = None,
    params: ParamsFile = Path("params.yaml"),
    metrics_dir: Annotated[Path, typer.Option(help="Where <model>.json and recall/<model>.csv go.")] = Path(
        "metrics"
    ),
) -> None:
    """Stage `evaluate@<model>`: Karpathy test retrieval (R@1/5/10, mAP, MRR both ways) and
    zero-shot top-1/top-5 of one CLIP checkpoint on the curated evaluation sets."""
    from stages import evaluate as stage

    stage.run(params, model, weights, metrics_dir)


@command(app)
def report(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to compare; the first is the reference. With --ablations: the variants."),
    ] = None,
    metrics_dir: Annotated[
        Path, typer.Option(help="Where the models' <model>.json are (--ablations: where its table goes).")
    ] = Path("metrics"),
    ablations: Annotated[
        bool,
        typer.Option("--ablations", help="The study of the variants' experiments (with intervals) instead."),
    ] = False,
    seeds: Annotated[
        int, typer.Option(min=1, help="With --ablations: the seeds a missing variant's command asks for.")
    ] = 3,
    rev: Annotated[
        str | None,
        typer.Option(help="With --ablations: the baseline commit whose experiments to read (default: HEAD)."),
    ] = None,
    curated: Annotated[
        Path | None,
        typer.Option(
            help="The curated folder (curate.out): with it, also metrics/report.html and its gallery."
        ),
    ] = None,
    study: Annotated[
        Path | None, typer.Option(help="The study's table (metrics/ablations.json) for report.html.")
    ] = None,
) -> None:
    """Stage `report`: evaluated models side by side against the first (absolute and relative
    gains, zero-shot retention) as metrics/report.json and metrics/report.md. With --ablations:
    the study table (metrics/ablations.{json,md}) from the workspace and its experiments — every
    figure over seeds with a 95 % interval, paired differences from the base and from `full` —
    missing runs named."""
    from stages import report as stage

    if ablations:
        from stages import ablations as ablations_stage

        ablations_stage.report(models, metrics_dir, seeds=seeds, rev=rev)
        return
    if not models:
        _fail("name at least one model (or use --ablations)")
    stage.run(models, metrics_dir, curated, study)


@command(app, "regions-quality")
def regions_quality(
    images: Annotated[
        int, typer.Option(min=1, help="Training images to sample (each with its boxes).")
    ] = 1000,
    margin: Annotated[
        list[float] | None, typer.Option(help="Context margins to measure (repeat); default 0, 0.25, 0.5, 1.")
    ] = None,
    seed: int = 0,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """What the detector's crops carry in the base CLIP's space: zero-shot accuracy of the crops
    among the detector's classes, by context margin (embed.context_margin), as
    metrics/regions_quality.json. A teacher on regions can add no more than this."""
    from stages import region_quality as stage

    stage.run(params, images, margin or [0.0, 0.25, 0.5, 1.0], seed)


@command(ablations_app, "run")
def ablations_run(
    names: Annotated[
        list[str] | None, typer.Argument(help="Ablations to run (default: all); `dclip ablations list`.")
    ] = None,
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds 0 … N-1 of each variant (teacher.seed and distill.seed).")
    ] = 1,
    skip_existing: Annotated[
        bool, typer.Option(help="Keep an experiment already made for this commit instead of re-running it.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the `dvc exp run` commands only.")] = False,
) -> None:
    """Run variants over seeds as DVC experiments (`dvc exp run --temp -n NAME-sK -S …`, one after
    another; the workspace is untouched, and is itself `full` with its seed); then
    `dclip report --ablations` for the study table with intervals."""
    from stages import ablations as stage

    stage.run(names, seeds=seeds, skip_existing=skip_existing, dry_run=dry_run)


@command(ablations_app, "list")
def ablations_list() -> None:
    """Every ablation: its row of Table 4, its params overrides and its command."""
    from stages import ablations as stage

    typer.echo(stage.describe())


@command(demo_app, "train-models")
def train_models(
    work: Annotated[Path, typer.Option(help="Scratch folder for the pretraining split and runs.")] = Path(
        "data/demo-pretrain"
    ),
    train_images: Annotated[int, typer.Option(min=1)] = 20000,
    val_images: Annotated[int, typer.Option(min=1)] = 1000,
    clip_epochs: Annotated[int, typer.Option(min=1)] = 16,
    yolo_epochs: Annotated[int, typer.Option(min=1)] = 8,
    yolo_images: Annotated[int, typer.Option(min=1)] = 2500,
    single_object_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of CLIP training images with one object.")
    ] = 0.0,
    hard_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share of each CLIP batch that shares one colour.")
    ] = 0.0,
    only: Annotated[str, typer.Option(help="both, clip or yolo")] = "both",
    seed: int = 0,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """Train the demo's small CLIP (on the world's web domain) and YOLO (on its curated domain) from
    scratch; write demo/weights/*.pt with a JSON card each (command, seed, data, time, quality)."""
    from stages import demo_models as stage

    if only not in ("both", "clip", "yolo"):
        _fail(f"--only must be both, clip or yolo, got {only!r}")
    stage.run(
        params,
        work,
        train_images,
        val_images,
        clip_epochs,
        yolo_epochs,
        yolo_images,
        single_object_fraction,
        hard_fraction,
        only,
        seed,
    )


@command(demo_app, "cards")
def demo_cards(
    only: Annotated[str, typer.Option(help="both, clip or yolo")] = "both",
    weights: Annotated[Path, typer.Option(help="Folder of the weights and their cards.")] = Path(
        "demo/weights"
    ),
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """Measure the committed demo weights again on the fresh images their cards name, with the
    project's metric definitions (pipeline.metrics), and rewrite the cards' quality fields; the
    training provenance is kept."""
    import json

    from stages import demo_models as stage

    if only not in ("both", "clip", "yolo"):
        _fail(f"--only must be both, clip or yolo, got {only!r}")
    for name, quality in stage.cards(params, weights, only).items():
        typer.echo(f"{name}: {json.dumps(quality)}")


@command(app)
def doctor(
    root: Annotated[Path, typer.Option(help="The project folder (where data/ goes).")] = Path("."),
    params: Annotated[
        Path | None,
        typer.Option("--params", "-p", help="The params whose run to size (default: ROOT/params.yaml)."),
    ] = None,
) -> None:
    """What this machine offers: torch, its CUDA build, the NVIDIA driver, the GPUs, what
    `device: auto` picks and why not a GPU, CPU threads, free disk, what data/ holds, and the disk
    the params' run will need (an upper bound)."""
    import json

    from stages import doctor as stage

    typer.echo(json.dumps(stage.report(root, params), indent=2))


@command(app)
def search(
    queries: Annotated[list[str] | None, typer.Argument(help="Texts to search for.")] = None,
    images: Annotated[Path, typer.Option(help="The folder of images (searched recursively).")] = Path("."),
    weights: Annotated[
        str, typer.Option(help="A checkpoint (models/student.pt, data/weights/clip.pt) or an open_clip tag.")
    ] = "models/student.pt",
    model: Annotated[
        str | None, typer.Option(help="The architecture (default: the params' clip.model).")
    ] = None,
    queries_file: Annotated[Path | None, typer.Option(help="More queries, one per line.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Images per query.")] = 5,
    html: Annotated[
        Path | None, typer.Option(help="Also write a contact sheet (one offline HTML page).")
    ] = None,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """The images of a folder that best match each text, by a CLIP checkpoint: rank, cosine, path.
    The folder's embeddings are kept (under runtime.scratch/search/), keyed by the checkpoint and
    every file's content: reused while nothing changes, rebuilt when a file does."""
    from stages import search as stage

    texts = list(queries or [])
    if queries_file is not None:
        texts += [
            line.strip() for line in queries_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    stage.run(texts, images, weights, params, model, top_k, html)


@command(config_app, "list")
def config_list(params: ParamsFile = Path("params.yaml")) -> None:
    """The recipes in configs/ (whole params files); `*` marks the one params.yaml is now."""
    from stages import recipes

    current = params.read_bytes() if params.is_file() else None
    for recipe in recipes.available(params):
        mark = "*" if recipe.path.read_bytes() == current else " "
        typer.echo(f"{mark} {recipe.name:<20} {recipe.title}")


@command(config_app, "use")
def config_use(
    name: Annotated[str, typer.Argument(help="A recipe in configs/, e.g. paper-vit-b32.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite uncommitted edits to params.")] = False,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """Validate configs/NAME.yaml and copy it over params.yaml.

    Refused if params.yaml has uncommitted changes, unless --force; `git checkout params.yaml`
    brings the demo back."""
    from stages import recipes

    recipe = recipes.use(name, params, force)
    typer.echo(
        f"{params} is now {recipe.path.relative_to(params.parent)} ({recipe.name}).\n"
        f"Run the study with `dvc repro dvc.yaml` (the demo world is not part of it);\n"
        f"`git checkout {params.name}` brings the demo params back."
    )


def main() -> None:  # pragma: no cover - the console script
    sys.exit(app())


if __name__ == "__main__":  # `python -m stages.cli …`: how torchrun starts a training stage's processes
    main()
