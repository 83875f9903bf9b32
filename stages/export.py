"""Stage `export` (dvc.yaml): the student as a folder open_clip loads by itself (config, safetensors
weights, model card), the project's DVC model artifact."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_params
from pipeline.export import Card, export, read_metrics
from stages.outputs import METRICS_DIR, info_path, require

REFERENCE = "base"  # the card compares the student with the base CLIP it was distilled from


def run(params_file: Path, metrics_dir: Path = METRICS_DIR) -> dict:
    params = load_params(params_file, only=("clip", "curate", "teacher", "distill", "export"))
    root = params_file.parent
    student, distilled = root / params.distill.out, info_path("distill", root / metrics_dir)
    require(params_file, [(student, "distill"), (distilled, "distill")])
    text_tower = json.loads(distilled.read_text())["text_tower_sha256"]
    d, mix = params.distill, params.curate.mix.model_dump()
    card = Card(
        name=params.export.name,
        architecture=params.clip.model,
        base=f"`{params.clip.pretrained}` (clip.pretrained)",
        description=(
            "A CLIP whose image tower was fine-tuned by Distill CLIP (DCLIP): InfoNCE against the "
            "frozen text tower plus a pull toward a cross-modal meta-teacher that attends over YOLO "
            "regions and caption tokens. The text tower is the base model's, unchanged (checked by "
            "hash while training). Made by the dclip pipeline (`dvc repro`)."
        ),
        details={
            "Text tower sha256 (unchanged)": f"`{text_tower}`",
            "Training pairs (curate.mix)": ", ".join(f"{k} {v}" for k, v in mix.items()),
            "Teacher target": params.teacher.target,
            "Loss": f"InfoNCE + {d.lambda_cos} × (1 − cos(student, teacher)) + {d.lambda_anchor} × anchor",
            "Training": f"{d.epochs} epochs, batch {d.batch_size} × {d.accumulate}, AdamW lr {d.lr}",
            "Trainable image-tower blocks": "all" if d.trainable_blocks is None else str(d.trainable_blocks),
        },
    )
    models = {name: root / metrics_dir / f"{name}.json" for name in (REFERENCE, "student")}
    written = export(params.clip.model, student, root / params.export.out, card, read_metrics(models))
    print(json.dumps({"out": params.export.out, **written}))
    return written
