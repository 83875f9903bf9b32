"""The demo's own small CLIP, trained from scratch on the world's web-domain pretraining split.

No pretrained CLIP can be had offline, so the demo trains a small open_clip CLIP (both towers,
contrastive loss, open_clip's tokenizer) on images that no pipeline split uses; its YOLO is
trained by yolo_training.py, and both are measured on fresh images by cards.py.

The CLIP is pretrained on the world's *web* domain (object-centric images, alt-text captions;
see pipeline/demo/world/scene.py), the YOLO on its *curated* domain: as a real CLIP is pretrained
on web data and then meets COCO and Flickr30k, while a real YOLO is trained on COCO itself. So the
base CLIP does well on the zero-shot sets (drawn like its pretraining data) and has room to adapt
to the curated pairs, which is what distillation is for.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.demo.world.scene import COLOURS
from pipeline.train import lr_factor

# open_clip's ModifiedResNet at 64 px (config in pipeline/models/configs/). Measured on 2 CPU
# cores: a ViT at 128 px / patch 16 learned colours but no shapes in 15 minutes (zero-shot shape
# at chance); this ResNet is 2.7x faster per image and learns shapes in the same time.
CLIP_MODEL = "DCLIP-Demo-RN64"


# --- data ------------------------------------------------------------------------------------


Preprocess = Callable[[Image.Image], torch.Tensor]


def load_split(folder: Path, split: str, preprocess: Preprocess) -> tuple[torch.Tensor, list[list[str]]]:
    """Images of one split, preprocessed (normalised, float16 to halve memory), and their captions.

    The preprocessed tensor is cached beside the split, keyed by the transform, so that a second
    training run skips minutes of decoding and resizing."""
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == split]
    # Keyed by the transform and the split's whole caption file, which changes with its images.
    listing = (folder / "captions.jsonl").read_bytes()
    key = hashlib.sha256(f"{preprocess}|{split}|".encode() + listing).hexdigest()[:16]
    cache = folder / f"preprocessed-{split}-{key}.pt"
    if cache.exists():
        images = torch.load(cache)
    else:
        images = torch.empty((len(rows), 3, *_input_size(preprocess)), dtype=torch.float16)
        for i, r in enumerate(tqdm(rows, desc=f"load {split}", leave=False)):
            with Image.open(folder / r["image"]) as im:
                images[i] = preprocess(im.convert("RGB")).half()
        tmp = cache.with_suffix(".tmp")
        torch.save(images, tmp)
        tmp.replace(cache)
    return images, [r["captions"] for r in rows]


def _input_size(preprocess: Preprocess) -> tuple[int, int]:
    height, width = preprocess(Image.new("RGB", (200, 150))).shape[-2:]
    return int(height), int(width)


# --- training --------------------------------------------------------------------------------


def colour_groups(captions: list[list[str]]) -> dict[str, np.ndarray]:
    """For every colour of the world, the indices of the images whose captions name that colour and
    no other: within such a group colour tells nothing, only shape, count, size and place do."""
    named = [set(re.findall(r"[a-z]+", " ".join(caps).lower())) & set(COLOURS) for caps in captions]
    groups = {c: np.array([i for i, n in enumerate(named) if n == {c}], dtype=np.int64) for c in COLOURS}
    return {c: g for c, g in groups.items() if len(g)}


def batch_indices(
    order: torch.Tensor, b: int, size: int, hard: int, groups: dict[str, np.ndarray], gen: torch.Generator
) -> torch.Tensor:
    """Batch b: `size - hard` images from the epoch's permutation plus `hard` images of one colour
    group (drawn at random), without repeats.

    Hard negatives on purpose: in a random batch the colours of a scene single it out almost
    always, so a contrastive model learns colours and stays blind to shape (measured: shape at
    chance with random batches). Among images that share a colour, only shape, size, position
    and the other objects tell the captions apart."""
    easy = order[b * (size - hard) : (b + 1) * (size - hard)]
    if hard == 0:
        return easy
    names = sorted(groups)
    group = torch.from_numpy(groups[names[int(torch.randint(len(names), (1,), generator=gen))]])
    pick = group[torch.randperm(len(group), generator=gen)[: hard + len(easy)]]
    pick = pick[~torch.isin(pick, easy)][:hard]
    return torch.cat([easy, pick])


def train_clip(
    folder: Path,
    epochs: int,
    # Large batches on purpose: in a batch of 128 the colours, count and background of a scene
    # usually single it out already, and the model never has to learn shapes.
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 100,
    seed: int = 0,
    hard_fraction: float = 0.0,
) -> tuple[torch.nn.Module, dict]:
    import open_clip

    from pipeline.models.clip import create

    torch.manual_seed(seed)
    model, preprocess, tokenizer = create(CLIP_MODEL, "none")
    images, captions = load_split(folder, "train", preprocess)
    tokens = tokenizer([c for caps in captions for c in caps]).view(
        len(captions), -1, tokenizer.context_length
    )
    # Not pipeline.train.decay_groups: this grouping also spares the token embedding from decay,
    # and the committed weights were trained with it. The schedule is pipeline.train's own.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    hard = int(round(hard_fraction * batch_size))
    groups = colour_groups(captions) if hard else {}
    # An epoch still sees every image once through the permutation (the easy part of the batches).
    steps_per_epoch = len(images) // (batch_size - hard)
    total = epochs * steps_per_epoch
    model.train()
    start, step, losses = time.perf_counter(), 0, []
    bar = tqdm(total=total, desc="train clip")
    for _epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        which = torch.randint(0, tokens.shape[1], (len(images),), generator=gen)
        for b in range(steps_per_epoch):
            idx = batch_indices(order, b, batch_size, hard, groups, gen)
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, total, warmup)
            img_f = model.encode_image(images[idx].float(), normalize=True)
            txt_f = model.encode_text(tokens[idx, which[idx]], normalize=True)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    model.eval()
    return model, {
        "train_images": len(images),
        "captions_per_image": tokens.shape[1],
        "epochs": epochs,
        "steps": total,
        "batch_size": batch_size,
        "hard_negatives_per_batch": hard,
        "lr": lr,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
