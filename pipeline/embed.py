"""embed: the CLIP embedding cache of every training pair.

For each (image, caption) pair of the curated training shards, with the base CLIP:
the whole-image embedding; region embeddings (the whole image as region 0, then a crop per detect
box, each through the model's own preprocessing, normalisation included, then the image tower);
the pooled caption embedding; the caption's token embeddings (pipeline.models.clip.encode_tokens);
region weights (pipeline.regions). Embeddings are the raw projections into the joint space (not
L2-normalised; a reader normalises when it wants cosines), stored as float16. Region weights are
computed from the stored float16 values, so the cache alone reproduces them.

An image is encoded once even when it has several captions (curate's captions_per_image: all):
its first pair in shard order encodes it, and a later pair in another shard reads the regions
from that shard's part. A detect reject (an image that could not be read) and an image that
fails to decode here are skipped and recorded as rejects, never given a zero vector.

Outputs, under `out`:

    images.parquet     one row per image: image, key (its encoding pair), shard, width, height,
                       regions, embedding [D]
    regions.parquet    one row per region: image, region (0 = whole image), box (pixels, xyxy),
                       crop (the integer box cut, margin included), confidence, area, class,
                       class_name, embedding [D]
    captions.parquet   one row per pair: key, image, shard, caption, embedding [D], tokens [T][D],
                       length (T), similarities [R] (cosine to each region), weights [R]
    rejects.parquet    key, image, shard, reason, detail
    teacher/<shard>.tar   WebDataset, one sample per pair, named like the curated shard:
                       <key>.regions.npy float16 [R, D], <key>.weights.npy float32 [R],
                       <key>.prior.npy float32 [R] (the weights without the caption factor),
                       <key>.tokens.npy float16 [T, D], <key>.caption.npy float16 [D],
                       <key>.image.npy float16 [D], <key>.json {"image": image key}

`embed_shard` is the batch function, one curated shard in, one part out. `embed` maps it over the
shards with resume, as detect does: each part is a folder under scratch/<run key>/ named by a
digest of its inputs (the shard's bytes, its detect rows, its pairs' images), written under a
temporary name and renamed when whole; a killed run redoes only the shards without a part. The
parts are then streamed into `out`, which is renamed into place only when complete.

Throughput: threads decode, crop and run the transform's PIL steps ahead of the model (PIL
releases the GIL), the crops wait as uint8 and are scaled and normalised a batch at a time (bit
for bit the transform's result, see split_preprocess), crops of several images fill each batch,
captions are encoded only up to the batch's longest caption (the causal mask makes padding
irrelevant), and memory holds one shard's embeddings and a bounded window of crops.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.transforms import functional as tv_functional
from tqdm import tqdm

from pipeline import images, regions
from pipeline.detect import IMAGE_EXTS, file_hash, ordered_map
from pipeline.models import clip
from pipeline.regions import Combination
from pipeline.shards import ShardWriter, read_shard
from pipeline.tables import concat_parquet, write_table

TABLES = ("images", "regions", "captions", "rejects")
# Columns of detect's regions table that embed reads.
DETECT_COLUMNS = ("key", "width", "height", "boxes", "confidences", "classes", "class_names", "reject")
MANIFEST_COLUMNS = ("key", "shard", "image")


class EmbedError(RuntimeError):
    """Inputs that do not fit together (a stale regions table, a missing manifest row, ...) or a
    model that cannot be used as asked; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    """What, besides the model and the inputs, decides the outputs."""

    context_margin: float = 0.0  # per side, a fraction of the box's width (height)
    weights: Combination = "product"
    max_regions: int | None = None  # per image, the whole image included; None: every box
    batch_size: int = 64  # crops (captions) per forward; float results may differ in the last bits

    def __post_init__(self) -> None:
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError("max_regions counts the whole image: it must be at least 1")
        if self.weights not in regions.COMBINATIONS:
            raise ValueError(f"weights {self.weights!r}: expected one of {regions.COMBINATIONS}")


# --- schemas -------------------------------------------------------------------------------------


def _vec(dim: int, dtype: pa.DataType | None = None) -> pa.DataType:
    return pa.list_(dtype or pa.float16(), dim)


def _str(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False)


def _int(name: str) -> pa.Field:
    return pa.field(name, pa.int32(), nullable=False)


def schemas(dim: int) -> dict[str, pa.Schema]:
    """The output tables for a model with a `dim`-dimensional joint space."""
    vec = pa.field("embedding", _vec(dim), nullable=False)
    floats = pa.list_(pa.float32())
    return {
        "images": pa.schema(
            [_str("image"), _str("key"), _str("shard"), _int("width"), _int("height"), _int("regions"), vec]
        ),
        "regions": pa.schema(
            [
                _str("image"),
                _int("region"),
                pa.field("box", _vec(4, pa.float32()), nullable=False),
                pa.field("crop", _vec(4, pa.int32()), nullable=False),
                pa.field("confidence", pa.float32(), nullable=False),
                pa.field("area", pa.float32(), nullable=False),
                _int("class"),
                _str("class_name"),
                vec,
            ]
        ),
        "captions": pa.schema(
            [
                _str("key"),
                _str("image"),
                _str("shard"),
                _str("caption"),
                vec,
                pa.field("tokens", pa.list_(_vec(dim)), nullable=False),
                _int("length"),
                pa.field("similarities", floats, nullable=False),
                pa.field("weights", floats, nullable=False),
            ]
        ),
        "rejects": pa.schema([_str("key"), _str("image"), _str("shard"), _str("reason"), _str("detail")]),
    }


# --- the model -----------------------------------------------------------------------------------


@dataclass
class Encoder:
    """A CLIP on a device: float32 on the CPU, float16 autocast on CUDA."""

    net: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    dim: int
    digest: str  # what the weights are: for cache keys

    def __post_init__(self) -> None:
        self._split = split_preprocess(self.preprocess)

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def pixels(self, crops: list[Image.Image]) -> torch.Tensor:
        """Worker side: crops through the model's preprocess as far as it goes crop by crop:
        uint8 (R, S, S, 3) after its PIL steps when it splits (see split_preprocess), else the
        whole transform, float (R, 3, S, S)."""
        if self._split is None:
            return torch.stack([self.preprocess(c) for c in crops])
        arrays = [np.asarray(self._split[0](c)) for c in crops]
        if any(a.dtype != np.uint8 or a.ndim != 3 for a in arrays):
            raise EmbedError(f"the preprocess's PIL steps gave {arrays[0].dtype} {arrays[0].shape}, not RGB")
        return torch.from_numpy(np.stack(arrays))

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of `pixels` on the device, as the whole transform makes it: (n, 3, S, S)."""
        x = pixels.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # ToTensor's scaling, then Normalize, for the whole batch
            norm = self._split[1]
            x = x.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div_(255)
            x = tv_functional.normalize(x, norm.mean, norm.std, inplace=True)
        return x

    @torch.inference_mode()
    def images(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, D) float16 image embeddings of a batch from `pixels`."""
        with self._autocast():
            out = self.net.encode_image(self.model_input(pixels))
        return out.float().cpu().numpy().astype(np.float16)

    @torch.inference_mode()
    def texts(self, captions: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Per caption its token embeddings (T_i, D) float16, and the pooled embeddings (n, D)."""
        text = self.tokenizer(captions).to(self.device)
        with self._autocast():
            tokens, pooled, lengths = clip.encode_tokens(self.net, text)
        tokens = tokens.float().cpu().numpy().astype(np.float16)
        return [t[:n] for t, n in zip(tokens, lengths.tolist())], pooled.float().cpu().numpy().astype(
            np.float16
        )


def split_preprocess(preprocess: Callable) -> tuple[Callable, Callable] | None:
    """CLIP's eval transform, when it is the usual Compose([PIL steps..., ToTensor, Normalize]),
    as (its PIL steps, its Normalize): ToTensor's scaling and Normalize are elementwise, so
    applying them to a stacked uint8 batch gives bit for bit what the transform gives crop by
    crop, at a fraction of the cost, and the crops wait for the model in a quarter of the
    memory. None for any other transform: it then runs whole, crop by crop."""
    from torchvision import transforms as tv

    steps = list(getattr(preprocess, "transforms", []))
    at = [i for i, t in enumerate(steps) if isinstance(t, tv.ToTensor)]
    if len(at) != 1 or [type(t) for t in steps[at[0] + 1 :]] != [tv.Normalize]:
        return None
    return tv.Compose(steps[: at[0]]), steps[-1]


def load_encoder(model: str, pretrained: str, device: str = "auto", base_dir: Path | str = ".") -> Encoder:
    """The base CLIP from params: `pretrained` an open_clip tag, a checkpoint path (relative to
    base_dir) or "none": the architecture randomly initialised from a fixed seed, the same
    weights every run."""
    from pipeline.models.detector import DetectorError, select_device

    try:
        dev = select_device(device)
    except DetectorError as err:
        raise EmbedError(str(err)) from None
    path = Path(base_dir) / pretrained
    is_file = pretrained != "none" and path.is_file()
    weights = str(path) if is_file else pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, preprocess, tokenizer = clip.create(model, weights, dev)
    except Exception as err:  # open_clip raises RuntimeError, FileNotFoundError, ...
        raise EmbedError(f"cannot load CLIP {model!r} with weights {pretrained!r}: {err}") from None
    if not isinstance(net, clip.open_clip.CLIP):
        raise EmbedError(f"{model!r} is a {type(net).__name__}: token embeddings need open_clip's CLIP")
    if is_file:
        digest = file_hash(path)
    else:  # a tag names fixed weights; "none" is seeded above
        digest = f"{model}:{pretrained}" + ("@seed0" if pretrained == "none" else "")
    dim = int(clip.open_clip.get_model_config(model)["embed_dim"])
    return Encoder(net, preprocess, tokenizer, dev, dim, digest)


# --- which pair encodes which image --------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """The pairs of one shard: their image, whether this pair encodes it (the image's first pair
    in shard order) and otherwise the shard (name) whose part holds it."""

    image: dict[str, str]
    home: dict[str, str]  # pair key → shard name of the image's first pair
    encodes: frozenset[str]

    def digest(self) -> str:
        spec = sorted((k, self.image[k], self.home[k], k in self.encodes) for k in self.image)
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


class Plan:
    """From the manifest (train.parquet): which pair encodes each image. Holds three string
    columns of the manifest, not embeddings."""

    def __init__(self, manifest: pa.Table):
        names = pc.replace_substring_regex(manifest.column("shard"), pattern=r"^.*/", replacement="")
        order = np.argsort(np.asarray(names.to_pylist(), dtype=object), kind="stable")
        self.keys = np.asarray(manifest.column("key").to_pylist(), dtype=object)[order]
        self.shards = np.asarray(names.to_pylist(), dtype=object)[order]
        self.images = np.asarray(manifest.column("image").to_pylist(), dtype=object)[order]
        _, first, inverse = np.unique(self.images.astype(str), return_index=True, return_inverse=True)
        self.first = first[inverse.reshape(-1)]  # row of each row's image's first pair
        self._rows: dict[str, list[int]] = {}
        for i, s in enumerate(self.shards.tolist()):
            self._rows.setdefault(s, []).append(i)

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            return cls(pq.read_table(path, columns=list(MANIFEST_COLUMNS)))
        except (OSError, pa.ArrowException) as err:
            raise EmbedError(f"{path}: cannot read the curated manifest ({err})") from None

    def shard_names(self) -> list[str]:
        return list(self._rows)

    def shard(self, name: str) -> ShardPlan:
        rows = np.asarray(self._rows.get(name, []), dtype=np.int64)
        keys = self.keys[rows].tolist()
        first = self.first[rows]
        return ShardPlan(
            image=dict(zip(keys, self.images[rows].tolist())),
            home=dict(zip(keys, self.shards[first].tolist())),
            encodes=frozenset(k for k, f, r in zip(keys, first.tolist(), rows.tolist()) if f == r),
        )


# --- one shard -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """A detect row: boxes by descending confidence, or the reason the image was rejected."""

    width: int | None
    height: int | None
    boxes: np.ndarray
    confidences: np.ndarray
    classes: np.ndarray
    class_names: list[str]
    reject: str | None


def read_detections(path: Path, shard: str) -> dict[str, Detection]:
    """The detect rows of one shard (its file name), by key. detect writes a row group per
    shard, so the filter reads only that shard's rows."""
    try:
        t = pq.read_table(path, columns=list(DETECT_COLUMNS), filters=[("shard", "==", shard)])
    except (OSError, pa.ArrowException) as err:
        raise EmbedError(f"{path}: not a readable regions table from detect ({err})") from None
    cols = {c: t.column(c) for c in DETECT_COLUMNS}
    boxes = cols["boxes"].combine_chunks()
    conf = cols["confidences"].combine_chunks()
    cls = cols["classes"].combine_chunks()
    flat_boxes = np.asarray(boxes.flatten().flatten().to_numpy(zero_copy_only=False), np.float32).reshape(
        -1, 4
    )
    flat_conf = np.asarray(conf.flatten().to_numpy(zero_copy_only=False), np.float32)
    flat_cls = np.asarray(cls.flatten().to_numpy(zero_copy_only=False), np.int32)
    counts = [pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in (boxes, conf, cls)]
    if not (np.array_equal(counts[0], counts[1]) and np.array_equal(counts[0], counts[2])):
        raise EmbedError(f"{path}: shard {shard}: boxes, confidences and classes differ in length")
    offsets = np.asarray(boxes.offsets.to_numpy()) - boxes.offsets[0].as_py()
    out = {}
    rows = zip(*(cols[c].to_pylist() for c in ("key", "width", "height", "class_names", "reject")))
    for i, (key, w, h, names, reject) in enumerate(rows):
        a, b = offsets[i], offsets[i + 1]
        order = np.argsort(-flat_conf[a:b], kind="stable")
        out[key] = Detection(
            w,
            h,
            flat_boxes[a:b][order],
            flat_conf[a:b][order],
            flat_cls[a:b][order],
            [names[j] for j in order],
            reject,
        )
    return out


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    detail: str


@dataclass
class Prepared:
    """An image ready for the model: its crops preprocessed, and what the regions tables need."""

    pixels: torch.Tensor  # (R, ...): Encoder.pixels
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
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        return Reject("no_image", f"no image member among {sorted(sample)}")
    try:
        image = images.decode(data)
    except images.ImageReject as err:
        return Reject(err.reason, err.message)
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
            self.out.append(self.encoder.images(x[i : min(i + self.batch_size, n)]))
        self.pending = [x[n:]] if n < len(x) else []
        self.count = len(x) - n

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.out) if self.out else np.zeros((0, self.encoder.dim), np.float16)


@dataclass
class Part:
    """One shard's outputs: the four tables and the teacher samples."""

    tables: dict[str, pa.Table]
    teacher: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _fixed(flat: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(flat).ravel()), width)


def _nested(parts: list[np.ndarray], width: int | None, dtype: np.dtype) -> pa.Array:
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
    pool: ThreadPoolExecutor,
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
            t, p = encoder.texts(captions[: settings.batch_size])
            tokens.extend(t)
            pooled.append(p)
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
    for key, result, caption in ordered_map(pool, work, read_shard(path), window):
        if on_pairs:
            on_pairs(1)
        if isinstance(result, Reject):
            rejects[key] = result
            continue
        if isinstance(result, Prepared):
            enc_order.append((key, plan.image[key], result))
            images_b.add(result.pixels)
            result.pixels = None  # the batcher holds them until encoded
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


# --- every shard, resumable ------------------------------------------------------------------------


def run_key(encoder: Encoder, settings: Settings) -> str:
    """Hash of everything but the inputs that the outputs depend on."""
    import open_clip
    import PIL

    modules = (sys.modules[__name__], regions, clip, images, sys.modules[ShardWriter.__module__])
    spec = {
        "weights": encoder.digest,
        "device": encoder.device.type,
        "amp": encoder.amp,
        "preprocess": repr(encoder.preprocess),
        "settings": asdict(settings),
        "versions": [
            open_clip.__version__,
            torch.__version__,
            pa.__version__,
            np.__version__,
            PIL.__version__,
        ],
        "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in modules],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _detections_digest(dets: dict[str, Detection]) -> str:
    h = hashlib.sha256()
    for key in sorted(dets):
        d = dets[key]
        h.update(json.dumps([key, d.width, d.height, d.class_names, d.reject]).encode())
        for a in (d.boxes, d.confidences, d.classes):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_part(folder: Path, part: Part) -> None:
    """The part's tables and teacher shard into `folder`, which appears only when complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for name, table in part.tables.items():
            write_table(tmp / f"{name}.parquet", table, table.schema)
        with ShardWriter(tmp / "teacher", max_count=max(1, len(part.teacher))) as writer:
            for key, fields in part.teacher:
                writer.write(key, fields)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_stored(part: Path, wanted: set[str]) -> dict[str, Stored]:
    """Stored regions of the `wanted` images from a part's regions table."""
    t = pq.read_table(
        part / "regions.parquet",
        columns=["image", "confidence", "area", "embedding"],
        filters=[("image", "in", sorted(wanted))],
    )
    names = t.column("image").to_pylist()
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    emb = emb.astype(np.float16).reshape(len(names), -1)
    conf = t.column("confidence").to_numpy()
    area = t.column("area").to_numpy()
    out, start = {}, 0
    for i in range(1, len(names) + 1):  # an image's regions are contiguous rows, region 0 first
        if i == len(names) or names[i] != names[start]:
            out[names[start]] = Stored(emb[start:i], conf[start:i], area[start:i])
            start = i
    return out


def embed(
    shards: list[Path],
    manifest: Path,
    regions_table: Path,
    out: Path,
    scratch: Path,
    encoder: Encoder,
    settings: Settings,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Embeddings of every shard's pairs into `out` (see the module doc), resuming from the parts
    in `scratch`; returns the counts for the metrics file. Other runs' parts are removed once
    `out` is whole."""
    folder = scratch / run_key(encoder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp-*"):  # a killed run's unfinished part
        shutil.rmtree(stale, ignore_errors=True)
    plan = Plan.read(manifest)
    absent = sorted(set(plan.shard_names()) - {s.name for s in shards})
    if absent:
        raise EmbedError(f"{manifest}: lists pairs in shard(s) {absent[:3]} that are not among the shards")
    part_of: dict[str, Path] = {}
    reused = 0
    bar = tqdm(desc="embed", unit="pair", disable=not progress)

    def elsewhere(wanted: dict[str, set[str]]) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        for home, imgs in sorted(wanted.items()):
            if home not in part_of:
                raise EmbedError(
                    f"images {sorted(imgs)[:3]} are encoded in shard {home}, which was not embedded"
                )
            found.update(read_stored(part_of[home], imgs))
        return found

    with ThreadPoolExecutor(workers, thread_name_prefix="crop") as pool:
        for shard in shards:
            sp = plan.shard(shard.name)
            if not sp.image:
                raise EmbedError(
                    f"{manifest}: no pairs of shard {shard.name}; the manifest and shards differ"
                )
            dets = read_detections(regions_table, shard.name)
            homes = sorted({part_of[h].name for h in sp.home.values() if h != shard.name and h in part_of})
            digest = hashlib.sha256(
                json.dumps([file_hash(shard), _detections_digest(dets), sp.digest(), homes]).encode()
            ).hexdigest()[:16]
            part = folder / f"{shard.stem}-{digest}"
            if part.is_dir():
                reused += 1
                bar.update(len(sp.image))
            else:
                result = embed_shard(shard, dets, sp, encoder, settings, pool, elsewhere, bar.update)
                write_part(part, result)
            part_of[shard.name] = part
            bar.set_postfix(shards=f"{len(part_of)}/{len(shards)}", reused=reused)
    bar.close()
    assemble(out, [(s.name, part_of[s.name]) for s in shards], encoder.dim)
    _prune(scratch, folder, set(part_of.values()))
    return summarise(out, len(shards))


def assemble(out: Path, parts: list[tuple[str, Path]], dim: int) -> None:
    """Stream the parts into `out`: the tables concatenated, the teacher shards linked under
    their curated shard's name; `out` is replaced only once complete."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for name, schema in schemas(dim).items():
            concat_parquet(tmp / f"{name}.parquet", [p / f"{name}.parquet" for _, p in parts], schema)
        (tmp / "teacher").mkdir()
        for shard, p in parts:
            for src in sorted((p / "teacher").glob("*.tar")):  # none when every pair was rejected
                _link_or_copy(src, tmp / "teacher" / shard)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space; nothing writes to a finished shard in place.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def summarise(out: Path, shards: int) -> dict:
    """Counts over the output: a function of its bytes alone, so the metrics file is too."""
    meta = {name: pq.ParquetFile(out / f"{name}.parquet").metadata for name in TABLES}
    pairs, images_ = meta["captions"].num_rows, meta["images"].num_rows
    n_regions = meta["regions"].num_rows
    regions_per_image = (
        pq.read_table(out / "images.parquet", columns=["regions"]).column("regions").to_numpy()
    )
    lengths = pq.read_table(out / "captions.parquet", columns=["length"]).column("length").to_numpy()
    reasons = Counter(pq.read_table(out / "rejects.parquet", columns=["reason"]).column("reason").to_pylist())
    table_bytes = sum((out / f"{name}.parquet").stat().st_size for name in TABLES)
    teacher_bytes = sum(p.stat().st_size for p in (out / "teacher").glob("*.tar"))
    per_1000 = 1000 / max(pairs, 1) / 2**20
    return {
        "shards": shards,
        "pairs": pairs,
        "images": images_,
        "regions": n_regions,
        "regions_per_image": round(n_regions / max(images_, 1), 4),
        "images_without_detections": int((regions_per_image == 1).sum()),
        "tokens_per_caption": round(float(lengths.mean()) if pairs else 0.0, 4),
        "rejects": sum(reasons.values()),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "cache_mb_per_1000_pairs": {
            "tables": round(table_bytes * per_1000, 3),
            "teacher_shards": round(teacher_bytes * per_1000, 3),
            "total": round((table_bytes + teacher_bytes) * per_1000, 3),
        },
    }


def _prune(scratch: Path, folder: Path, keep: set[Path]) -> None:
    """Remove other runs' part folders and parts of shards this run did not read."""
    for entry in scratch.iterdir():
        if entry.is_dir() and entry != folder and re.fullmatch(r"[0-9a-f]{16}", entry.name):
            shutil.rmtree(entry)
    for part in folder.iterdir():
        if part.is_dir() and part not in keep:
            shutil.rmtree(part)
