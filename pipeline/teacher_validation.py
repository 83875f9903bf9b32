"""Validating the teacher on held-out training images, without leaking the caption it reads.

The held-out slice is a fixed fraction of the training *images* (all their pairs together, by a
hash of (seed, image); never Karpathy val or test). A target conditioned on a caption retrieves
that caption trivially, so every epoch measures each target against captions it was NOT
conditioned on (`unseen_validation`): per image one caption j is drawn; the paper target t(i, j) is
scored against the image's other captions, the other_captions target (conditioned on those)
against caption j, the regions target against all of them — next to the base CLIP image embedding
on the same captions, and with the target's cosine to the base image embedding and to caption j.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from pipeline.losses import info_nce
from pipeline.metrics import retrieval_metrics
from pipeline.models.teacher import TeacherWithScale
from pipeline.teacher_pairs import Pair, collate, unit


@torch.no_grad()
def embed_pairs(
    model: TeacherWithScale, pairs: list[Pair], batch_size: int, device, prior: bool
) -> torch.Tensor:
    """The teacher's embedding of each pair (conditioned on the pair's own caption, unless the
    teacher reads none), float32 on the CPU."""
    model.eval()
    out = [
        model(collate(pairs[i : i + batch_size], prior).to(device)).float().cpu()
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def by_image(pairs: list[Pair]) -> dict[str, list[int]]:
    """Indices of each image's pairs, images and pairs in key order."""
    groups: dict[str, list[int]] = {}
    for i in sorted(range(len(pairs)), key=lambda i: pairs[i].key):
        groups.setdefault(pairs[i].image_id, []).append(i)
    return dict(sorted(groups.items()))


def drawn_caption(image_id: str, n: int, seed: int) -> int:
    """Which of an image's n pairs (in key order) the validation conditions on: fixed by
    (seed, image)."""
    digest = hashlib.sha256(f"{seed}|drawn|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _r_at(image: torch.Tensor, caption: torch.Tensor, owner: torch.Tensor, prefix: str) -> dict[str, float]:
    m = retrieval_metrics(image, caption, owner, ks=(1, 5))
    return {
        f"{prefix}t2i_R@1": m["text_to_image"]["R@1"],
        f"{prefix}i2t_R@1": m["image_to_text"]["R@1"],
        f"{prefix}t2i_R@5": m["text_to_image"]["R@5"],
        f"{prefix}i2t_R@5": m["image_to_text"]["R@5"],
    }


def unseen_validation(embedded: torch.Tensor, pairs: list[Pair], target: str, seed: int) -> dict[str, float]:
    """Each image's target scored against captions it was not conditioned on (module doc), with
    the base CLIP image embedding on the same captions. `embedded`: the teacher's embedding of
    every pair in `pairs`. Images that leave no unseen caption (one caption, paper and
    other_captions targets) are left out; with none left the result is empty."""
    targets: list = []
    bases: list = []
    own: list = []
    captions: list = []
    owner: list = []
    for image_id, idx in by_image(pairs).items():
        if target != "regions" and len(idx) < 2:
            continue
        j = drawn_caption(image_id, len(idx), seed)
        others = [k for n, k in enumerate(idx) if n != j]
        if target == "paper":
            t, scored = embedded[idx[j]], others
        elif target == "other_captions":
            t, scored = F.normalize(embedded[others].sum(0), dim=-1), [idx[j]]
        else:
            t, scored = embedded[idx[j]], idx
        image = len(targets)
        targets.append(t)
        bases.append(unit(pairs[idx[j]].image))
        own.append(unit(pairs[idx[j]].caption))
        captions += [unit(pairs[k].caption) for k in scored]
        owner += [image] * len(scored)
    if len(targets) < 2:
        return {}
    t, b, c = torch.stack(targets), torch.stack(bases), torch.stack(own)
    caps, owners = torch.stack(captions), torch.tensor(owner)
    return {
        "images": len(targets),
        "captions": len(captions),
        **_r_at(t, caps, owners, "unseen_"),
        **_r_at(b, caps, owners, "base_"),
        "cos_base_image": float((t * b).sum(-1).mean()),
        "cos_own_caption": float((t * c).sum(-1).mean()),
        "base_cos_own_caption": float((b * c).sum(-1).mean()),
    }


def validate(
    model: TeacherWithScale, pairs: list[Pair], batch_size: int, device, target: str, seed: int, prior: bool
) -> dict[str, float]:
    """The training objective on the held-out images (InfoNCE against each pair's own caption)
    and the leak-free measures of `unseen_validation`, prefixed val_."""
    if len(pairs) < 2:
        return {}
    embedded = embed_pairs(model, pairs, batch_size, device, prior)
    caption = torch.stack([unit(p.caption) for p in pairs])
    with torch.no_grad():
        loss = float(info_nce(embedded, caption, model.scale().cpu()))
    unseen = unseen_validation(embedded, pairs, target, seed)
    return {"val_loss": loss, **{f"val_{k}": v for k, v in unseen.items()}}


def unseen_score(record: dict) -> float | None:
    """What `use_epoch: best` maximises: the mean of the unseen-caption R@1 both ways."""
    a, b = record.get("val_unseen_t2i_R@1"), record.get("val_unseen_i2t_R@1")
    return None if a is None or b is None else (a + b) / 2


def best_epoch(history: list[dict]) -> int:
    """The epoch with the best unseen-caption R@1 (the earliest on a tie); an error without them."""
    scored = [(unseen_score(h), -h["epoch"]) for h in history if unseen_score(h) is not None]
    if not scored:
        raise ValueError(
            "teacher.use_epoch: best needs the unseen-caption validation, which this cache cannot give "
            "(no held-out image with two captions: curate.captions_per_image: all); name an epoch"
        )
    return -max(scored)[1]
