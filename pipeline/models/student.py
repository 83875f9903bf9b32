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


def tower_blocks(visual: torch.nn.Module) -> tuple[list[str], tuple[str, ...]]:
    """The image tower's blocks in order, as parameter-name prefixes inside `visual`, and the
    prefixes of its head (what follows the last block). open_clip's ViT: its transformer blocks,
    then ln_post and the projection; its ModifiedResNet: the bottlenecks of layer1..layer4, then
    the attention pool."""
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None:
        return [f"transformer.resblocks.{i}." for i in range(len(resblocks))], (
            "ln_post.",
            "proj",
            "attn_pool",
            "head.",
        )
    stages = [getattr(visual, f"layer{k}", None) for k in range(1, 5)]
    layers = [s for s in stages if isinstance(s, torch.nn.Sequential)]
    if len(layers) == len(stages) and hasattr(visual, "attnpool"):
        return [f"layer{k}.{j}." for k, s in enumerate(layers, 1) for j in range(len(s))], ("attnpool.",)
    raise ValueError(
        f"distill.trainable_blocks: the image tower {type(visual).__name__} has neither transformer "
        "blocks nor ResNet stages; train all of it (null)"
    )


def image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The CLIP model's image tower, `model.visual`."""
    return model.get_submodule("visual")


def trainable_names(model: torch.nn.Module, blocks: int | None) -> list[str]:
    """Names of the image-tower parameters that train: all of them (blocks None), or the last
    `blocks` blocks and the head after them (see tower_blocks)."""
    visual = image_tower(model)
    names = [f"{VISUAL}{n}" for n, _ in visual.named_parameters()]
    if blocks is None:
        return names
    prefixes, head = tower_blocks(visual)
    if not 0 <= blocks <= len(prefixes):
        raise ValueError(f"distill.trainable_blocks: {blocks} is not within 0..{len(prefixes)} blocks")
    train = tuple(prefixes[len(prefixes) - blocks :]) + head
    return [n for n in names if n.removeprefix(VISUAL).startswith(train)]


def freeze_for_distillation(model: torch.nn.Module, blocks: int | None) -> list[torch.nn.Parameter]:
    """Set requires_grad on exactly the trainable image-tower parameters; return them."""
    train = set(trainable_names(model, blocks))
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    return [p for n, p in model.named_parameters() if n in train]


def checkpoint_activations(model: torch.nn.Module, enable: bool) -> bool:
    """Gradient checkpointing of the image tower's transformer blocks (open_clip's own): each
    block's activations are recomputed in the backward pass instead of kept, so training memory
    no longer grows with the depth. The arithmetic is the same, so the weights are too (tested);
    it costs about one more forward pass. Returns whether it is on: a ResNet tower has no
    checkpointed blocks in open_clip, and there the setting changes nothing."""
    visual = image_tower(model)
    blocks = getattr(visual, "transformer", None)
    if blocks is None or not hasattr(blocks, "grad_checkpointing"):
        return False
    visual.set_grad_checkpointing(enable)  # type: ignore[operator]
    return enable


def set_train_mode(model: torch.nn.Module, freeze_batchnorm: bool = True) -> None:
    """Training mode for the image tower only: the frozen text side stays in eval mode (no
    dropout), so its outputs are those of the base model. With `freeze_batchnorm` the image
    tower's BatchNorm layers stay in eval mode too: they normalise with the base model's running
    statistics and never update them (their affine weights still train where trainable).
    Measured on the demo's ResNet tower: statistics drifting on small fine-tuning batches cost
    about a point of retrieval and of zero-shot accuracy."""
    model.eval()
    visual = image_tower(model)
    visual.train()
    if freeze_batchnorm:
        for module in visual.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
