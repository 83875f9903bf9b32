"""CLIP models through open_clip: the project's own configs registered, weights from a tag, a
local file or nowhere."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from pipeline.tables import atomic_torch_save

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
    atomic_torch_save({"state_dict": state}, path)


def encode_tokens(
    net: torch.nn.Module, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption token embeddings in the joint space, as open_clip's `CLIP.encode_text` computes
    them but kept for every token: the text transformer's final hidden states through `ln_final`
    and `text_projection`. Returns (tokens [B, L, D], pooled [B, D], lengths [B]): caption i's
    real tokens (start, words, end of text) are tokens[i, :lengths[i]], and pooled[i], the token
    that encode_text pools (end of text), is tokens[i, lengths[i] - 1].

    L is the longest caption's length, not the context length: under the causal mask a token
    never sees the padding after it, so the padding is not computed at all."""
    if not isinstance(net, open_clip.CLIP):
        raise TypeError(f"token embeddings need open_clip's CLIP text tower, not {type(net).__name__}")
    if net.text_pool_type == "argmax":  # the end-of-text token has the highest id
        end = text.argmax(dim=-1)
    elif net.text_pool_type == "eos":
        end = (text == net.text_eos_id).int().argmax(dim=-1)
    else:
        raise ValueError(f"text pool type {net.text_pool_type!r}: no end-of-text token to pool")
    lengths = end + 1
    n = int(lengths.max()) if net.attn_mask is not None else text.shape[1]
    cast_dtype = net.transformer.get_cast_dtype()
    x = net.token_embedding(text[:, :n]).to(cast_dtype)
    x = x + net.positional_embedding[:n].to(cast_dtype)
    mask = net.attn_mask[:n, :n] if net.attn_mask is not None else None
    x = net.ln_final(net.transformer(x, attn_mask=mask))
    if isinstance(net.text_projection, torch.nn.Linear):
        x = net.text_projection(x)
    elif net.text_projection is not None:
        x = x @ net.text_projection
    pooled = x[torch.arange(len(x), device=x.device), end]
    return x, pooled, lengths
