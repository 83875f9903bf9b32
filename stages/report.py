"""Stage `report` (dvc.yaml): every evaluated model beside the reference (the first named, the base
CLIP), as metrics/report.json and metrics/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import MissingOutput
from pipeline.files import atomic_file
from pipeline.report import compare, to_markdown
from stages.outputs import METRICS_DIR, read_record


def run(models: list[str], metrics_dir: Path = METRICS_DIR) -> dict:
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
    print(markdown, end="")
    return report


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
