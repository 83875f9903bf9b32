"""CLIP models through open_clip: the project's own configs registered, weights from a tag, a
local file or nowhere."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "configs"
# The project's small configs (the demo CLIP) join open_clip's own, under their file names.
open_clip.add_model_config(CONFIG_DIR)


def available_models() -> list[str]:
    """Architecture names that open_clip can build: its own configs and the project's."""
    return open_clip.list_models()


def create(model: str, pretrained: str = "none", device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for an architecture and its weights.

    `pretrained`: an open_clip tag (fetched by open_clip when online), a checkpoint path, or
    "none" for the real architecture, randomly initialised. The preprocess is CLIP's own eval
    transform, normalisation included.
    """
    weights = None if pretrained == "none" else pretrained
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device)
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def save_checkpoint(net: torch.nn.Module, path: Path, half: bool = True) -> None:
    """A state dict that `open_clip.create_model_and_transforms(name, pretrained=path)` loads;
    float16 storage halves the file and loads into a float32 model unchanged in use."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": state}, tmp)
    tmp.replace(path)
