"""Stage `report` (dvc.yaml): every evaluated model beside the reference (the first named, the base
CLIP), as metrics/report.json and metrics/report.md; with the curated sets at hand, also the
self-contained metrics/report.html (plots, the study's intervals, the retrieval gallery)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import report_html
from pipeline.errors import MissingOutput
from pipeline.evalsets import RETRIEVAL_SETS
from pipeline.files import atomic_file
from pipeline.report import compare, to_markdown
from stages.outputs import METRICS_DIR, read_record


def run(
    models: list[str],
    metrics_dir: Path = METRICS_DIR,
    curated: Path | None = None,
    study: Path | None = None,
) -> dict:
    """The report of `models` from `metrics_dir`; with `curated` (the curated folder: the gallery's
    captions and images) the HTML page too, with `study` (metrics/ablations.json) its tables."""
    missing = [m for m in models if not (metrics_dir / f"{m}.json").is_file()]
    if missing:
        raise MissingOutput(
            f"no metrics for {', '.join(missing)} in {metrics_dir}/: run `dclip evaluate --model NAME` first"
        )
    results = {m: read_record(metrics_dir, m) for m in models}  # figures with sizes and chance
    report = compare(results)
    _write(metrics_dir / "report.json", json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    _write(metrics_dir / "report.md", markdown)
    if curated is not None:
        _write(
            metrics_dir / "report.html",
            report_html.render(_page(report, models, metrics_dir, curated, study)),
        )
    print(markdown, end="")
    return report


def _page(
    report: dict, models: list[str], metrics_dir: Path, curated: Path, study: Path | None
) -> report_html.Page:
    """Everything the HTML page shows, read from what the stages wrote."""
    recall = {m: report_html.read_recall(metrics_dir / "recall" / f"{m}.csv") for m in models}
    training = {
        stage: report_html.read_live(metrics_dir / stage / "plots" / "metrics")
        for stage in ("teacher", "distill")
        if (metrics_dir / stage / "plots" / "metrics").is_dir()
    }
    galleries = []
    if len(models) >= 2:
        queries = {m: pq.read_table(metrics_dir / "queries" / f"{m}.parquet").to_pylist() for m in models[:2]}
        built = {r["dataset"] for r in queries[models[0]]} & {r["dataset"] for r in queries[models[1]]}
        galleries = [
            report_html.gallery_view(curated, name, queries, (models[0], models[1]))
            for name in RETRIEVAL_SETS
            if name in built
        ]
    return report_html.Page(
        report=report,
        study=json.loads(study.read_text()) if study is not None else None,
        recall=recall,
        training=training,
        galleries=galleries,
    )


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
