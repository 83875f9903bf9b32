"""One curated shard in, one part out: `embed_shard`, the batch function a distributed engine maps."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import images, parallel, regions
from pipeline.embed.plan import Detection, ShardPlan
from pipeline.embed.tables import EmbedError, Settings, schemas
from pipeline.images import Reject
from pipeline.models.clip import Encoder
from pipeline.shards import read_shard


@dataclass
class Prepared:
    """An image ready for the model: its crops preprocessed, and what the regions tables need."""

    pixels: torch.Tensor | None  # (R, ...): Encoder.pixels; None once handed to the batcher
    width: int
    height: int
    boxes: np.ndarray  # (R, 4) float32 pixels, region 0 the whole image
    crops: np.ndarray  # (R, 4) int
    confidences: np.ndarray  # (R,)
    areas: np.ndarray  # (R,)
    classes: np.ndarray  # (R,)
    class_names: list[str]


def prepare(
    sample: dict[str, bytes], det: Detection, encoder: Encoder, settings: Settings
) -> Prepared | Reject:
    """Worker: a shard sample and its detect row → its preprocessed regions, or a Reject."""
    if det.reject is not None:
        return Reject(det.reject, "rejected by detect")
    image = images.decode_sample(sample)
    if isinstance(image, Reject):
        return image
    if (image.width, image.height) != (det.width, det.height):
        raise EmbedError(
            f"image is {image.width}x{image.height} but detect saw {det.width}x{det.height}: "
            "the regions table is older than the curated shards; run detect again"
        )
    keep = len(det.boxes) if settings.max_regions is None else settings.max_regions - 1
    boxes, conf, area = regions.with_whole_image(
        det.boxes[:keep], det.confidences[:keep], image.width, image.height
    )
    cut = regions.crop_boxes(boxes[1:], image.width, image.height, settings.context_margin)
    pixels = encoder.pixels(regions.crops(image, cut))
    whole = np.array([[0, 0, image.width, image.height]], dtype=np.int64)
    return Prepared(
        pixels=pixels,
        width=image.width,
        height=image.height,
        boxes=boxes,
        crops=np.concatenate([whole, cut]),
        confidences=conf,
        areas=area,
        classes=np.concatenate([[regions.WHOLE_IMAGE_CLASS], det.classes[:keep]]).astype(np.int32),
        class_names=[regions.WHOLE_IMAGE_NAME, *det.class_names[:keep]],
    )


@dataclass
class Stored:
    """An image's regions as cached: float16 embeddings and the weight inputs."""

    embeddings: np.ndarray  # (R, D) float16
    confidences: np.ndarray
    areas: np.ndarray


class _Batcher:
    """Crops of consecutive images into batches of exactly batch_size (the last one smaller), so
    that the batches, and with them the float results, do not depend on the worker count."""

    def __init__(self, encoder: Encoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.pending: list[torch.Tensor] = []
        self.count = 0
        self.out: list[np.ndarray] = []

    def add(self, pixels: torch.Tensor) -> None:
        self.pending.append(pixels)
        self.count += len(pixels)
        if self.count >= self.batch_size:
            self.flush(whole_batches_only=True)

    def flush(self, whole_batches_only: bool = False) -> None:
        if not self.pending:
            return
        x = torch.cat(self.pending)
        n = len(x) - len(x) % self.batch_size if whole_batches_only else len(x)
        for i in range(0, n, self.batch_size):
            emb = self.encoder.encode_images(x[i : min(i + self.batch_size, n)])
            self.out.append(emb.numpy().astype(np.float16))
        self.pending = [x[n:]] if n < len(x) else []
        self.count = len(x) - n

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.out) if self.out else np.zeros((0, self.encoder.dim), np.float16)


@dataclass
class Part:
    """One shard's outputs: the four tables and the teacher samples."""

    tables: dict[str, pa.Table]
    teacher: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # WebDataset samples


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _fixed(flat: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(flat).ravel()), width)


def _nested(parts: list[np.ndarray], width: int | None, dtype: type[np.generic]) -> pa.Array:
    """A list column from per-row arrays (n_i,) or (n_i, width)."""
    lengths = np.array([len(p) for p in parts], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    shape = (0, width) if width else (0,)
    flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)
    values = _fixed(flat, width) if width else pa.array(flat)
    return pa.ListArray.from_arrays(offsets, values)


def embed_shard(
    path: Path | str,
    detections: dict[str, Detection],
    plan: ShardPlan,
    encoder: Encoder,
    settings: Settings,
    pool: Executor,
    elsewhere: Callable[[dict[str, set[str]]], dict[str, Stored]] | None = None,
    on_pairs: Callable[[int], None] | None = None,
) -> Part:
    """The embeddings of one shard's pairs, decoded and cropped by `pool`. `elsewhere` gives the
    stored regions of images that an earlier shard encoded ({shard name: image keys} in,
    {image key: Stored} out); only curate's captions_per_image: all needs it."""
    path = Path(path)
    shard = path.name
    images_b = _Batcher(encoder, settings.batch_size)
    enc_order: list[tuple[str, str, Prepared]] = []  # (pair key, image, regions) per encoded image
    pairs: list[tuple[str, str]] = []  # (key, caption) of pairs to embed
    rejects: dict[str, Reject] = {}
    captions: list[str] = []
    tokens: list[np.ndarray] = []
    pooled: list[np.ndarray] = []

    def encode_captions(final: bool = False) -> None:
        while len(captions) >= settings.batch_size or (final and captions):
            t, p = encoder.encode_tokens(captions[: settings.batch_size])
            tokens.extend(x.numpy().astype(np.float16) for x in t)
            pooled.append(p.numpy().astype(np.float16))
            del captions[: settings.batch_size]

    def work(item: tuple[str, dict[str, bytes]]):
        key, sample = item
        if key not in plan.image:
            raise EmbedError(f"{path}: key {key!r} is not in the curated manifest; run curate again")
        if key not in detections:
            raise EmbedError(
                f"{path}: key {key!r} has no row in the regions table: it is older than the curated "
                "shards; run detect again"
            )
        if "txt" not in sample:
            return key, Reject("no_caption", "no txt member"), None
        caption = sample["txt"].decode("utf-8")
        if key not in plan.encodes:
            det = detections[key]
            return key, (Reject(det.reject, "rejected by detect") if det.reject else None), caption
        return key, prepare(sample, detections[key], encoder, settings), caption

    # Images prepared ahead: about a batch of crops, so the model never waits and memory holds
    # a bounded window of preprocessed pixels.
    window = max(4, settings.batch_size // 4)
    for key, result, caption in parallel.ordered_map(work, read_shard(path), pool, window):
        if on_pairs:
            on_pairs(1)
        if isinstance(result, Reject):
            rejects[key] = result
            continue
        if isinstance(result, Prepared):
            enc_order.append((key, plan.image[key], result))
            # The batcher holds the pixels until encoded; the record lets go of them.
            pixels, result.pixels = result.pixels, None
            assert pixels is not None  # prepared once, handed over once
            images_b.add(pixels)
        pairs.append((key, caption))
        captions.append(caption)
        encode_captions()
    encode_captions(final=True)
    missing = set(plan.image) - {k for k, _ in pairs} - set(rejects)
    if missing:
        raise EmbedError(
            f"{path}: {len(missing)} manifest pair(s) not in the shard, e.g. {sorted(missing)[0]!r}"
        )

    region_emb = images_b.result()
    stored: dict[str, Stored] = {}
    start = 0
    for _, image, prep in enc_order:
        r = len(prep.boxes)
        stored[image] = Stored(region_emb[start : start + r], prep.confidences, prep.areas)
        start += r
    wanted: dict[str, set[str]] = {}
    for key, _ in pairs:
        image = plan.image[key]
        if image not in stored and plan.home[key] != shard:
            wanted.setdefault(plan.home[key], set()).add(image)
    if wanted:
        if elsewhere is None:
            raise EmbedError(f"{path}: pairs whose image another shard encodes, and no lookup given")
        stored.update(elsewhere(wanted))
    caption_emb = np.concatenate(pooled) if pooled else np.zeros((0, encoder.dim), np.float16)
    return _assemble(
        shard, plan, enc_order, pairs, tokens, caption_emb, stored, rejects, settings, encoder.dim
    )


def _assemble(
    shard: str,
    plan: ShardPlan,
    enc_order: list[tuple[str, str, Prepared]],
    pairs: list[tuple[str, str]],
    tokens: list[np.ndarray],
    caption_emb: np.ndarray,
    stored: dict[str, Stored],
    rejects: dict[str, Reject],
    settings: Settings,
    dim: int,
) -> Part:
    """The shard's rows and teacher samples from its embeddings."""
    schema = schemas(dim)
    # Images and regions.
    n_regions = [len(p.boxes) for _, _, p in enc_order]
    embs = [stored[image].embeddings for _, image, _ in enc_order]
    all_emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)

    def cat(attr: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        if not enc_order:
            return np.zeros(shape, dtype)
        return np.concatenate([getattr(p, attr) for _, _, p in enc_order]).astype(dtype)

    image_names = [image for _, image, _ in enc_order]
    tables = {
        "images": pa.Table.from_arrays(
            [
                pa.array(image_names, pa.string()),
                pa.array([k for k, _, _ in enc_order], pa.string()),
                pa.array([shard] * len(enc_order), pa.string()),
                pa.array([p.width for _, _, p in enc_order], pa.int32()),
                pa.array([p.height for _, _, p in enc_order], pa.int32()),
                pa.array(n_regions, pa.int32()),
                _fixed(np.stack([e[0] for e in embs]) if embs else np.zeros((0, dim), np.float16), dim),
            ],
            schema=schema["images"],
        ),
        "regions": pa.Table.from_arrays(
            [
                pa.array(np.repeat(np.array(image_names, dtype=object), n_regions).tolist(), pa.string()),
                pa.array(np.concatenate([np.arange(n) for n in n_regions]) if enc_order else [], pa.int32()),
                _fixed(cat("boxes", (0, 4), np.float32), 4),
                _fixed(cat("crops", (0, 4), np.int32), 4),
                pa.array(cat("confidences", (0,), np.float32)),
                pa.array(cat("areas", (0,), np.float32)),
                pa.array(cat("classes", (0,), np.int32)),
                pa.array([n for _, _, p in enc_order for n in p.class_names], pa.string()),
                _fixed(all_emb, dim),
            ],
            schema=schema["regions"],
        ),
    }
    # Pairs.
    rows: dict[str, list] = {c: [] for c in ("key", "image", "caption", "tokens", "emb", "sims", "weights")}
    teacher = []
    for (key, caption), tok, emb in zip(pairs, tokens, caption_emb):
        image = plan.image[key]
        if image not in stored:  # its encoding pair was rejected
            rejects[key] = Reject("image_rejected", f"image {image} was rejected at its first pair")
            continue
        s = stored[image]
        sims = regions.cosines(s.embeddings, emb)
        w = regions.region_weights(s.confidences, s.areas, sims, settings.weights)
        # The same weighting without the caption's factor: what a teacher that reads no caption
        # may use (teacher.target: regions).
        prior = regions.region_weights(s.confidences, s.areas, np.ones_like(sims), settings.weights)
        for c, v in zip(rows, (key, image, caption, tok, emb, sims, w)):
            rows[c].append(v)
        fields = {
            "regions": s.embeddings,
            "weights": w,
            "prior": prior,
            "tokens": tok,
            "caption": emb,
            "image": s.embeddings[0],
        }
        teacher.append((key, {f"{k}.npy": _npy(v) for k, v in fields.items()} | {"json": {"image": image}}))
    n = len(rows["key"])
    tables["captions"] = pa.Table.from_arrays(
        [
            pa.array(rows["key"], pa.string()),
            pa.array(rows["image"], pa.string()),
            pa.array([shard] * n, pa.string()),
            pa.array(rows["caption"], pa.string()),
            _fixed(np.stack(rows["emb"]) if n else np.zeros((0, dim), np.float16), dim),
            _nested(rows["tokens"], dim, np.float16),
            pa.array([len(t) for t in rows["tokens"]], pa.int32()),
            _nested(rows["sims"], None, np.float32),
            _nested(rows["weights"], None, np.float32),
        ],
        schema=schema["captions"],
    )
    order = sorted(rejects)
    tables["rejects"] = pa.table(
        {
            "key": order,
            "image": [plan.image.get(k, "") for k in order],
            "shard": [shard] * len(order),
            "reason": [rejects[k].reason for k in order],
            "detail": [rejects[k].detail for k in order],
        },
        schema=schema["rejects"],
    )
    return Part(tables, teacher)
