"""A CLIP checkpoint as a folder that open_clip loads without this project: the layout open_clip's
own Hugging Face Hub export writes, so that the folder can also be uploaded as it is.

    open_clip_config.json         the architecture and the preprocessing (open_clip's writer)
    open_clip_model.safetensors   the weights as the checkpoint stores them (float16 for a student)
    README.md                     a model card: what the model is, how it was made, how it scores

and loads with `open_clip.create_model_and_transforms("local-dir:FOLDER")` and
`open_clip.get_tokenizer("local-dir:FOLDER")`: no registered config, no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.push_to_hf_hub import generate_readme, save_config_for_hf
from safetensors.torch import save_file

from pipeline.errors import InputError
from pipeline.files import atomic_dir
from pipeline.models.clip import architecture as model_architecture
from pipeline.report import value_at

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
CARD = "README.md"

# The card's comparison: (data set, direction, figure) of the evaluate metrics, test sets only
# (Karpathy val is where choices were made).
RETRIEVAL = [
    ("coco", "text_to_image", "R@1"),
    ("coco", "image_to_text", "R@1"),
    ("flickr30k", "text_to_image", "R@1"),
    ("flickr30k", "image_to_text", "R@1"),
]
ZEROSHOT = [("imagenet", "top1"), ("cifar10", "top1"), ("cifar100", "top1")]


@dataclass(frozen=True)
class Card:
    """What the model card says beyond the numbers."""

    name: str  # the exported model's name
    architecture: str  # the open_clip architecture (clip.model)
    base: str  # where the base weights came from (clip.pretrained)
    description: str
    details: Mapping[str, Any]  # recipe facts, one line each


def export(
    architecture: str,
    checkpoint: Path,
    out: Path,
    card: Card,
    metrics: Mapping[str, Mapping] | None = None,
) -> dict[str, Any]:
    """Write `out` (replaced atomically) from an open_clip checkpoint of `architecture`; `metrics`
    (model name → evaluate's metrics JSON, the reference first) fill the card's comparison.
    Returns what was written: file sizes and the number of tensors."""
    config = model_architecture(architecture)
    if not config:
        raise InputError(f"clip.model {architecture!r}: open_clip has no config of that name")
    try:
        net, _, _ = open_clip.create_model_and_transforms(architecture, pretrained=str(checkpoint))
    except Exception as err:  # open_clip raises RuntimeError, KeyError, ... on a mismatched file
        raise InputError(f"{checkpoint}: not a checkpoint of {architecture!r}: {err}") from None
    tensors = _stored_tensors(checkpoint, net)
    with atomic_dir(out) as tmp:
        save_config_for_hf(net, tmp / CONFIG, model_config=config)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        # safetensors creates its file 0600; a model to share is readable like the files beside it.
        (tmp / WEIGHTS).chmod((tmp / CONFIG).stat().st_mode & 0o777)
        (tmp / CARD).write_text(model_card(card, metrics or {}), encoding="utf-8")
    return {
        "tensors": len(tensors),
        "bytes": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
    }


def _stored_tensors(checkpoint: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in its own dtype (a student is stored float16: the export is as
    small and holds exactly those values), under the names and in the order of the model's
    state dict. A tensor the model lacks, or one it has that the file lacks, is an error."""
    state = load_state_dict(str(checkpoint))
    wanted = net.state_dict()
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or extra:
        raise InputError(f"{checkpoint}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    # safetensors refuses tensors that share memory and needs contiguous ones.
    return {k: state[k].detach().clone().contiguous() for k in wanted}


def comparison(metrics: Mapping[str, Mapping]) -> str:
    """A Markdown table of the test figures, one column per model (values in percent)."""
    names = list(metrics)
    rows: list[str | None] = []
    for data, direction, figure in RETRIEVAL:
        cells = [value_at(metrics[n], ("retrieval", data, direction, figure)) for n in names]
        label = f"{data} {direction.replace('_to_', '→')} {figure}"
        rows.append(_row(label, cells))
    for data, figure in ZEROSHOT:
        cells = [value_at(metrics[n], ("zeroshot", data, figure)) for n in names]
        rows.append(_row(f"{data} zero-shot {figure}", cells))
    kept = [r for r in rows if r is not None]
    if not kept:
        return ""
    head = ["| test figure (%) | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    return "\n".join(head + kept) + "\n"


def _row(label: str, cells: list[float | None]) -> str | None:
    if all(c is None for c in cells):
        return None
    return f"| {label} | " + " | ".join("–" if c is None else f"{100 * c:.2f}" for c in cells) + " |"


def model_card(card: Card, metrics: Mapping[str, Mapping]) -> str:
    """README.md in the format open_clip's hub export writes (its own generator)."""
    usage = (
        "```python\nimport open_clip\n\n"
        "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH')\n"
        "tokenizer = open_clip.get_tokenizer('local-dir:PATH')\n```\n"
        "`PATH` is this folder; uploaded to the Hugging Face Hub, `hf-hub:ORG/NAME` loads it the same way."
    )
    fields: dict[str, Any] = {
        "tags": ("clip", "open_clip", "distillation"),
        "license": "mit",
        "description": card.description,
        "details": {
            "Architecture": f"open_clip `{card.architecture}`",
            "Base weights": card.base,
            **card.details,
        },
        "usage": usage,
    }
    table = comparison(metrics)
    if table:
        fields["comparison"] = table + (
            "\nOne training run, on the Karpathy test splits and the zero-shot sets. Whether a "
            "difference is more than noise is the project's study to say (intervals over seeds, "
            "paired on the same queries: `dclip report --ablations`)."
        )
    return generate_readme(fields, card.name)


def read_metrics(files: Mapping[str, Path]) -> dict[str, Mapping]:
    """model name → evaluate's metrics JSON, for the models whose file exists."""
    return {name: json.loads(path.read_text()) for name, path in files.items() if path.is_file()}
