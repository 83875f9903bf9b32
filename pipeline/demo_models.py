"""The demo's own small backbones, trained from scratch on the world's pretraining splits.

No pretrained CLIP or COCO YOLO can be had offline, so the demo trains a small open_clip CLIP
(both towers, contrastive loss, open_clip's tokenizer) and a small ultralytics YOLO (ultralytics'
own trainer, one class per shape) on images that no pipeline split uses, and measures both on
freshly generated images.

The CLIP is pretrained on the world's *web* domain (object-centric images, alt-text captions;
see pipeline/world/scene.py), the YOLO on its *curated* domain: as a real CLIP is pretrained on web
data and then meets COCO and Flickr30k, while a real YOLO is trained on COCO itself. So the base
CLIP does well on the zero-shot sets (drawn like its pretraining data) and has room to adapt to
the curated pairs, which is what distillation is for.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.models.detector import prepare_ultralytics

# open_clip's ModifiedResNet at 64 px (config in pipeline/models/configs/). Measured on 2 CPU
# cores: a ViT at 128 px / patch 16 learned colours but no shapes in 15 minutes (zero-shot shape
# at chance); this ResNet is 2.7x faster per image and learns shapes in the same time.
CLIP_MODEL = "DCLIP-Demo-RN64"
ZERO_SHOT_PROMPT = "This is a photo of a {}"  # the paper's single prompt


# --- data ------------------------------------------------------------------------------------


def load_split(folder: Path, split: str, preprocess) -> tuple[torch.Tensor, list[list[str]]]:
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


def _input_size(preprocess) -> tuple[int, int]:
    probe = preprocess(Image.new("RGB", (200, 150)))
    return tuple(probe.shape[-2:])


# --- CLIP ------------------------------------------------------------------------------------


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def colour_groups(captions: list[list[str]]) -> dict[str, np.ndarray]:
    """For every colour of the world, the indices of the images whose captions name that colour and
    no other: within such a group colour tells nothing, only shape, count, size and place do."""
    from pipeline.world.scene import COLOURS

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
                group["lr"] = lr * cosine_schedule(step, total, warmup)
            img_f = model.encode_image(images[idx].float(), normalize=True)
            txt_f = model.encode_text(tokens[idx, which[idx]], normalize=True)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss))
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


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            model.encode_image(images[i : i + batch].float(), normalize=True)
            for i in range(0, len(images), batch)
        ]
    )


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch: int = 512) -> torch.Tensor:
    return torch.cat(
        [
            model.encode_text(tokenizer(texts[i : i + batch]), normalize=True)
            for i in range(0, len(texts), batch)
        ]
    )


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries (rows) with a positive among their top k; `positives` is a bool matrix."""
    top = scores.topk(max(ks), dim=1).indices
    hit = positives.gather(1, top)
    return {f"R@{k}": round(float(hit[:, :k].any(dim=1).float().mean()), 4) for k in ks}


def evaluate_clip(
    model, tokenizer, images: torch.Tensor, captions: list[list[str]], class_images, class_labels, class_names
) -> dict:
    """Retrieval on captioned images (every caption of an image is a positive) and zero-shot
    accuracy on single-object class images; chance levels beside each."""
    cls_img = encode_images(model, class_images)
    labels = torch.tensor(class_labels)
    return {
        "retrieval": retrieval_quality(model, tokenizer, images, captions),
        "zero_shot": {
            "classes": len(class_names),
            "images": len(labels),
            "chance": round(1 / len(class_names), 4),
            "prompt": ZERO_SHOT_PROMPT,
            **zero_shot(model, tokenizer, cls_img, labels, class_names, ZERO_SHOT_PROMPT),
            "bare_label": zero_shot(model, tokenizer, cls_img, labels, class_names, "a {}"),
        },
    }


def zero_shot(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, class_names, prompt: str) -> dict:
    """Top-1 over "colour shape" classes, and how often the colour and the shape alone are right."""
    cls_txt = encode_texts(model, tokenizer, [prompt.format(n) for n in class_names])
    pred = (images @ cls_txt.T).argmax(dim=1)
    colour = np.array([n.split()[0] for n in class_names])
    shape = np.array([n.split()[1] for n in class_names])
    p, t = pred.numpy(), labels.numpy()
    return {
        "top1": round(float((p == t).mean()), 4),
        "colour_right": round(float((colour[p] == colour[t]).mean()), 4),
        "shape_right": round(float((shape[p] == shape[t]).mean()), 4),
    }


def class_images(cfg, preprocess, per_class: int, offset: int):
    """Fresh single-object images of every colour-shape class in the web domain (as the zero-shot
    sets are drawn), from the web seed stream beyond the indices the split used."""
    from pipeline.world.generate import COLOUR_SHAPE_CLASSES, WEB, Job, make_sample

    images, labels = [], []
    for k, name in enumerate(COLOUR_SHAPE_CLASSES):
        colour, shape = name.split()
        for j in range(per_class):
            s = make_sample(
                Job(WEB, offset + k * per_class + j, single=(colour, shape), domain="web"),
                cfg.seed,
                tuple(cfg.image_size),
                cfg.max_objects,
            )
            with Image.open(io.BytesIO(s.data)) as im:
                images.append(preprocess(im.convert("RGB")))
            labels.append(k)
    return torch.stack(images), labels, COLOUR_SHAPE_CLASSES


def curated_images(cfg, preprocess, n: int, offset: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Fresh curated-domain scenes with five COCO-style captions each (the detector's seed
    stream, far beyond what its split used): what the base CLIP meets in the pipeline."""
    from pipeline.world.generate import PRETRAIN, Job, make_sample

    images, captions = [], []
    for i in range(n):
        s = make_sample(
            Job(PRETRAIN, offset + i, PRETRAIN, offset + i, "coco", 5),
            cfg.seed,
            tuple(cfg.image_size),
            cfg.max_objects,
        )
        with Image.open(io.BytesIO(s.data)) as im:
            images.append(preprocess(im.convert("RGB")))
        captions.append(list(s.captions))
    return torch.stack(images), captions


def retrieval_quality(model, tokenizer, images: torch.Tensor, captions: list[list[str]]) -> dict:
    """Retrieval with every caption of an image a positive, and chance levels."""
    img = encode_images(model, images)
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    txt = encode_texts(model, tokenizer, flat)
    pos = owner[:, None] == torch.arange(len(captions))[None, :]
    return {
        "images": len(captions),
        "captions": len(flat),
        "text_to_image": recall_at_k(txt @ img.T, pos),
        "image_to_text": recall_at_k(img @ txt.T, pos.T),
        # A random ranking hits at 1 with probability (positives ÷ candidates).
        "chance_R@1": {
            "text_to_image": round(float(pos.sum(1).float().mean()) / len(captions), 4),
            "image_to_text": round(float(pos.sum(0).float().mean()) / len(flat), 4),
        },
    }


# --- YOLO ------------------------------------------------------------------------------------


def train_yolo(
    data_yaml: Path, work: Path, arch: str, epochs: int, imgsz: int, batch: int, seed: int
) -> tuple[Path, dict]:
    from ultralytics import YOLO

    prepare_ultralytics()
    start = time.perf_counter()
    model = YOLO(arch)
    model.train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        workers=2,
        device="cpu",
        seed=seed,
        deterministic=True,
        project=str(work.resolve()),  # a relative project lands under ultralytics' runs/ folder
        name="yolo",
        exist_ok=True,
        plots=False,
        amp=False,
        optimizer="AdamW",
        lr0=0.002,
        cos_lr=True,
        close_mosaic=max(1, epochs // 4),
        verbose=False,
    )
    best = Path(model.trainer.best)
    metrics = YOLO(str(best)).val(
        data=str(data_yaml),
        imgsz=imgsz,
        batch=batch,
        device="cpu",
        plots=False,
        verbose=False,
        project=str(work.resolve()),
        name="val",
        exist_ok=True,
    )
    return best, {
        "arch": arch,
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "seconds": round(time.perf_counter() - start, 1),
        "val_precision": round(float(metrics.box.mp), 4),
        "val_recall": round(float(metrics.box.mr), 4),
        "val_mAP50": round(float(metrics.box.map50), 4),
        "val_mAP50_95": round(float(metrics.box.map), 4),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N×4) with every box in b (M×4), xyxy."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def detector_recall(
    weights: Path | str,
    cfg,
    n_images: int,
    offset: int,
    imgsz: int,
    min_visible: float = 0.6,
    conf: float = 0.25,
) -> dict:
    """Class-agnostic recall at IoU 0.5 (and class-aware precision) on fresh world images, over
    objects at least `min_visible` visible."""
    from ultralytics import YOLO

    from pipeline.world.generate import PRETRAIN, Job, make_sample
    from pipeline.world.scene import SHAPES

    model = YOLO(str(weights))
    found = total = tp = n_pred = 0
    for i in range(n_images):
        s = make_sample(Job(PRETRAIN, offset + i), cfg.seed, tuple(cfg.image_size), cfg.max_objects)
        with Image.open(io.BytesIO(s.data)) as im:
            r = model.predict(im.convert("RGB"), imgsz=imgsz, conf=conf, device="cpu", verbose=False)[0]
        pred = r.boxes.xyxy.numpy()
        pred_cls = r.boxes.cls.numpy().astype(int)
        gt = np.array([o.box for o in s.scene.objects], dtype=float)
        gt_cls = np.array([SHAPES.index(o.shape) for o in s.scene.objects])
        keep = np.array(s.scene.visible) >= min_visible
        iou = box_iou(gt, pred) if len(pred) else np.zeros((len(gt), 0))
        matched = (iou >= 0.5).any(axis=1) if len(pred) else np.zeros(len(gt), bool)
        found += int(matched[keep].sum())
        total += int(keep.sum())
        n_pred += len(pred)
        if len(pred):
            same = (iou >= 0.5) & (gt_cls[:, None] == pred_cls[None, :])
            tp += int(same.any(axis=0).sum())
    return {
        "images": n_images,
        "objects": total,
        "min_visible": min_visible,
        "conf": conf,
        "recall_iou50": round(found / max(1, total), 4),
        "precision_iou50_class": round(tp / max(1, n_pred), 4),
    }
