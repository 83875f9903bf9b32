"""The student: a CLIP whose image tower trains and whose text tower is frozen, provably.

Everything outside `model.visual` — token and positional embeddings, the text transformer, its
final norm and projection, and the logit scale — is frozen. The logit scale is frozen on
purpose: the student's contrastive term compares its image embeddings with the frozen caption
embeddings at the base model's own temperature, so the frozen text side is fully unchanged.
`frozen_hash` fingerprints every frozen tensor (parameters and buffers, by name and bytes); the
distill stage checks that it is identical before and after training.
"""

from __future__ import annotations

import hashlib

import torch

VISUAL = "visual."


def frozen_hash(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor outside the image tower."""
    h = hashlib.sha256()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(tensors):
        if name.startswith(VISUAL):
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_names(model: torch.nn.Module, blocks: int | None) -> list[str]:
    """Names of the image-tower parameters that train: all of them (blocks None), or the last
    `blocks` transformer blocks and everything after them (ln_post and the projection)."""
    visual = model.visual
    names = [f"{VISUAL}{n}" for n, _ in visual.named_parameters()]
    if blocks is None:
        return names
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is None:
        raise ValueError(
            f"distill.trainable_blocks: the image tower {type(visual).__name__} has no transformer "
            "blocks; train all of it (null)"
        )
    if not 0 <= blocks <= len(resblocks):
        raise ValueError(f"distill.trainable_blocks: {blocks} is not within 0..{len(resblocks)} blocks")
    first = len(resblocks) - blocks
    head = ("ln_post.", "proj", "attn_pool", "head.")  # what follows the blocks in open_clip's ViT
    return [
        n
        for n in names
        if n.startswith(tuple(f"{VISUAL}transformer.resblocks.{i}." for i in range(first, len(resblocks))))
        or n.removeprefix(VISUAL).startswith(head)
    ]


def freeze_for_distillation(model: torch.nn.Module, blocks: int | None) -> list[torch.nn.Parameter]:
    """Set requires_grad on exactly the trainable image-tower parameters; return them."""
    train = set(trainable_names(model, blocks))
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    return [p for n, p in model.named_parameters() if n in train]


def set_train_mode(model: torch.nn.Module) -> None:
    """Training mode for the image tower only: the frozen text side stays in eval mode (no
    dropout), so its outputs are those of the base model."""
    model.eval()
    model.visual.train()
