"""Evaluate a CLIP checkpoint on the curated evaluation sets: Karpathy val and test retrieval
(COCO, Flickr30k; val sets are named `<set>_val`), zero-shot classification (ImageNet, CIFAR-10,
CIFAR-100) and the compositional probe.

Besides the metrics, every query's outcome is kept (`Evaluation.queries`): the place of its best
positive, 0 for the top — a caption's image, an image's best caption, an image's class, a probe
item's true caption against its negative. Every metric here is a mean over queries of a function
of that place, so a study can bootstrap intervals over queries and pair two models on the same
queries (pipeline/study.py). Beside it, the query's best few candidates (what the report's gallery
shows).

Images stream from the curated WebDataset shards into batched `encode_image`, in batches that
never cross a shard: here through a DataLoader whose worker processes take whole shards, on the
Ray backend one job per shard on workers that hold the model; the same batches either way, so the
same embeddings. CUDA with autocast when the device is a GPU, float32 on CPU. Only the
embeddings are kept, in manifest order; the metrics are those of pipeline.metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline import images, metrics, parallel, runtime
from pipeline.errors import InputError, MissingOutput
from pipeline.evalsets import (
    CLASSNAMES,
    PROBE_SETS,
    RETRIEVAL_SETS,
    SINGLE_PROMPT,
    VAL_SETS,
    ZEROSHOT_SETS,
    check_built,
    manifest,
    read_classnames,
    set_dir,
    where,
)
from pipeline.models import clip
from pipeline.shards import read_shard

if TYPE_CHECKING:
    from pipeline.backend import Workers

RECALL_KS = (1, 5, 10)
TOP_KS = (1, 5)
CURVE_MAX_K = 50  # recall@k curves for `dvc plots`: k = 1 … this
TOP_SHOWN = 5  # each query's best candidates kept in the queries table (the report's gallery)


def prompt_templates(prompts: str) -> tuple:
    """ "single": the paper's one prompt; "openai": OpenAI's 80 ImageNet templates as open_clip
    ships them (the only template list it ships, so the CIFAR sets use it too)."""
    if prompts == "single":
        return (SINGLE_PROMPT,)
    if prompts == "openai":
        return tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)
    raise ValueError(f"prompts must be 'single' or 'openai', got {prompts!r}")


# --- images from shards ------------------------------------------------------------------------


def shard_batches(
    path: Path, transform: Callable, batch_size: int, pool: Executor | None = None
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, preprocessed images) of one shard, in batches of `batch_size` that never cross a
    shard: the batches, and so the float rounding of their embeddings, are the same whoever
    decodes them and however many decode. `pool` (threads) decodes ahead; None: here."""

    def decode(item: tuple[str, dict[str, bytes]]) -> tuple[str, torch.Tensor]:
        key, sample = item
        if images.image_member(sample) is None:
            raise InputError(f"{path}: sample {key!r} has no image ({', '.join(sorted(sample))})")
        img = images.decode_sample(sample)
        if isinstance(img, images.Reject):
            raise InputError(f"{path}: sample {key!r}: {img.reason}: {img.detail}")
        return key, transform(img)

    batch: list[tuple[str, torch.Tensor]] = []
    for item in parallel.ordered_map(decode, read_shard(path), pool, window=2 * batch_size):
        batch.append(item)
        if len(batch) == batch_size:
            yield [k for k, _ in batch], torch.stack([x for _, x in batch])
            batch = []
    if batch:
        yield [k for k, _ in batch], torch.stack([x for _, x in batch])


class ShardImages(IterableDataset):
    """shard_batches of every shard: DataLoader worker w of W takes shards w, w + W, … whole, so
    each tar is read once (a worker that took every n-th sample would read every tar)."""

    def __init__(self, paths: Sequence[Path], transform: Callable, batch_size: int):
        self.paths, self.transform, self.batch_size = list(paths), transform, batch_size

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for path in self.paths[worker::workers]:
            yield from shard_batches(path, self.transform, self.batch_size)


class Embeddings:
    """Embeddings of the keys of a set, in manifest order, filled batch by batch in any order:
    a key twice, a sample the manifest lacks or a key no shard holds is an error."""

    def __init__(self, keys: Sequence[str], desc: str):
        self.keys, self.desc = list(keys), desc
        self.index = {key: i for i, key in enumerate(keys)}
        if len(self.index) != len(keys):
            raise InputError(f"{desc}: the manifest lists a key twice")
        self.out: torch.Tensor | None = None
        self.seen = torch.zeros(len(keys), dtype=torch.bool)

    def put(self, shard: Path, keys: Sequence[str], emb: torch.Tensor) -> None:
        unknown = [k for k in keys if k not in self.index]
        if unknown:
            raise InputError(f"{shard}: sample {unknown[0]!r} is not in the set's manifest")
        idx = torch.tensor([self.index[k] for k in keys], dtype=torch.int64)
        if self.out is None:
            self.out = torch.empty(len(self.keys), emb.shape[1])
        if self.seen[idx].any():
            raise InputError(f"{self.desc}: a key appears in more than one sample of the shards")
        self.out[idx], self.seen[idx] = emb, True

    def whole(self) -> torch.Tensor:
        if self.out is None or not self.seen.all():
            missing = [self.keys[i] for i in (~self.seen).nonzero()[:3, 0].tolist()]
            raise InputError(
                f"{self.desc}: {int((~self.seen).sum())} manifest key(s) not in the shards, e.g. {missing}"
            )
        return self.out


# --- the encoders --------------------------------------------------------------------------------


class Encodes(Protocol):
    """What the evaluation needs of a model: whole sets of images and texts, and a classifier."""

    def images(
        self, root: Path, keys: Sequence[str], shards: Sequence[str], desc: str = "images"
    ) -> torch.Tensor: ...
    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor: ...
    def classes(self, classnames: Sequence[str], templates: Sequence) -> torch.Tensor: ...


def load_encoder(model: str, weights: str, device: str) -> clip.Encoder:
    """The CLIP checkpoint to evaluate, on `device` (a runtime.device setting)."""
    dev = runtime.pick_device(device)
    net, preprocess, tokenizer = clip.create(model, weights, dev)
    return clip.Encoder(net, preprocess, tokenizer, dev)


@dataclass
class SetEncoder:
    """Whole evaluation sets through a CLIP encoder in this process, batched: images read and
    decoded from their shards by DataLoader workers. Every embedding L2-normalised float32 on
    the CPU."""

    encoder: clip.Encoder
    batch_size: int
    workers: int  # decoding processes; 0 or 1: in this process (as pipeline.parallel's pools)
    progress: bool = True

    def images(
        self, root: Path, keys: Sequence[str], shards: Sequence[str], desc: str = "images"
    ) -> torch.Tensor:
        """Embeddings of the images `keys` (found in `shards`, paths relative to root), in the
        order of `keys`. Every key must be in the shards and every shard sample among the keys."""
        found = Embeddings(keys, desc)
        paths = [Path(root) / s for s in dict.fromkeys(shards)]
        loader = DataLoader(
            ShardImages(paths, self.encoder.preprocess, self.batch_size),
            batch_size=None,
            num_workers=min(self.workers, len(paths)) if self.workers > 1 else 0,
            pin_memory=self.encoder.device.type == "cuda",
        )
        with tqdm(total=len(keys), desc=desc, disable=not self.progress, leave=False) as bar:
            for batch_keys, pixels in loader:
                found.put(Path(root), batch_keys, self.encoder.encode_images(pixels, normalize=True))
                bar.update(len(batch_keys))
        return found.whole()

    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        chunks = []
        for start in tqdm(
            range(0, len(texts), self.batch_size), desc=desc, disable=not self.progress, leave=False
        ):
            chunks.append(self.encoder.encode_texts(texts[start : start + self.batch_size], normalize=True))
        return torch.cat(chunks)

    def classes(self, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
        """One embedding per class: the mean of its normalised prompt embeddings, renormalised
        (open_clip's own classifier builder)."""
        return self.encoder.classifier(classnames, templates, self.batch_size)


class Worker:
    """An evaluate worker (pipeline.backend): the model, loaded once, encoding whole shards and
    chunks of texts with the same batches as SetEncoder, so that its embeddings are the same."""

    def __init__(self, load: Callable[[], clip.Encoder], batch_size: int, threads: parallel.Count):
        self.encoder = load()
        self.local = SetEncoder(self.encoder, batch_size, 0, progress=False)
        self._stack = ExitStack()
        self.pool = self._stack.enter_context(parallel.pool(threads, "threads", name="decode"))

    def key(self) -> str:
        return f"{self.encoder.device.type} amp={self.encoder.amp}"

    def encode_shard(self, path: str, *, progress: Callable[[int], None]) -> tuple[list[str], torch.Tensor]:
        keys: list[str] = []
        chunks = []
        for batch_keys, pixels in shard_batches(
            Path(path), self.encoder.preprocess, self.local.batch_size, self.pool
        ):
            keys += batch_keys
            chunks.append(self.encoder.encode_images(pixels, normalize=True))
            progress(len(batch_keys))
        return keys, torch.cat(chunks) if chunks else torch.empty(0, self.encoder.dim)

    def encode_texts(self, texts: list[str], *, progress: Callable[[int], None]) -> torch.Tensor:
        return self.local.texts(texts)

    def classifier(
        self, classnames: list[str], templates: list, *, progress: Callable[[int], None]
    ) -> torch.Tensor:
        return self.local.classes(classnames, templates)

    def close(self) -> None:
        self._stack.close()


@dataclass
class RemoteSetEncoder:
    """SetEncoder's work on a backend's workers (Ray): a job per shard, per chunk of texts."""

    workers: Workers
    batch_size: int
    progress: bool = True

    def images(
        self, root: Path, keys: Sequence[str], shards: Sequence[str], desc: str = "images"
    ) -> torch.Tensor:
        found = Embeddings(keys, desc)
        paths = [Path(root) / s for s in dict.fromkeys(shards)]
        with tqdm(total=len(keys), desc=desc, disable=not self.progress, leave=False) as bar:
            results = self.workers.map("encode_shard", [(str(p),) for p in paths], progress=bar.update)
            for path, (batch_keys, emb) in zip(paths, results):
                found.put(path, batch_keys, emb)
        return found.whole()

    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        chunks = [(list(texts[s : s + self.batch_size]),) for s in range(0, len(texts), self.batch_size)]
        return torch.cat(list(self.workers.map("encode_texts", chunks)))

    def classes(self, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
        return next(iter(self.workers.map("classifier", [(list(classnames), list(templates))])))


# --- the evaluation ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    metrics: dict  # per data set: counts, metrics, chance levels
    curves: dict[str, list[float]]  # "<set>_<direction>" → recall at k = 1 … CURVE_MAX_K
    seconds: dict[str, float]  # per data set
    images: int = 0
    queries: list[dict] = field(default_factory=list)  # QUERY_COLUMNS, one entry per (set, task)


def required_files(curated: Path, datasets: Sequence[str]) -> list[Path]:
    """The curated files a run over `datasets` reads (shards are named by the manifests)."""
    files = [manifest(curated, name) for name in datasets]
    zeroshot = [where(name)[0] for name in datasets if name in ZEROSHOT_SETS]
    return files + [set_dir(curated, name) / CLASSNAMES for name in zeroshot]


def _manifest(path: Path, columns: list[str]) -> list[dict]:
    rows = pq.read_table(path, columns=columns).to_pylist()
    if not rows:
        raise InputError(f"{path}: the set is empty; leave it out of the data sets to evaluate")
    return rows


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def _queries(
    name: str,
    task: str,
    places: torch.Tensor,
    category: list[str] | None = None,
    top: torch.Tensor | None = None,
) -> dict:
    """One (set, task)'s per-query places (and top candidates), as columns of the queries table."""
    n = len(places)
    return {
        "dataset": [name] * n,
        "task": [task] * n,
        "category": category if category is not None else [None] * n,
        "query": list(range(n)),
        "place": places.to(torch.int64).tolist(),
        "top": top.tolist() if top is not None else [None] * n,
    }


def retrieval(encoder: Encodes, curated: Path, name: str) -> tuple[dict, dict[str, list[float]], list[dict]]:
    rows = _manifest(manifest(curated, name), ["key", "shard", "captions"])
    img = encoder.images(curated, [r["key"] for r in rows], [r["shard"] for r in rows], f"{name} images")
    captions = [c for r in rows for c in r["captions"]]
    text_image = torch.tensor([i for i, r in enumerate(rows) for _ in r["captions"]], dtype=torch.int64)
    txt = encoder.texts(captions, f"{name} captions")
    ranks = metrics.retrieval_ranks(img, txt, text_image)
    # CLIP_benchmark's R@k as its code counts it (torch.topk), the figure published numbers use.
    i2t = metrics.captions_of_images(text_image, len(rows))
    topk = {
        "text_to_image": metrics.topk_recall(txt, img, text_image[:, None], RECALL_KS),
        "image_to_text": metrics.topk_recall(img, txt, i2t, RECALL_KS),
    }
    per_image = torch.bincount(text_image, minlength=len(rows))
    chance = {
        "text_to_image": metrics.chance_recall_at_k(len(rows), torch.ones(len(captions)), RECALL_KS),
        "image_to_text": metrics.chance_recall_at_k(len(captions), per_image, RECALL_KS),
    }
    result: dict = {"images": len(rows), "captions": len(captions)}
    curves: dict = {}
    queries: list = []
    # What each query retrieved first: images for a caption, captions for an image (the report's gallery).
    top = {
        "text_to_image": metrics.top_candidates(txt, img, TOP_SHOWN),
        "image_to_text": metrics.top_candidates(img, txt, TOP_SHOWN),
    }
    for direction, r in ranks.items():
        result[direction] = _round(metrics.summarise(r, RECALL_KS))
        result[direction]["clip_benchmark"] = _round({f"R@{k}": v for k, v in topk[direction].items()})
        curve = metrics.recall_at_k(r, range(1, CURVE_MAX_K + 1))
        curves[f"{name}_{direction}"] = [round(v, 4) for v in curve.values()]
        queries.append(_queries(name, direction, metrics.best_ranks(r), top=top[direction]))
    result["chance"] = {d: _round({f"R@{k}": v for k, v in c.items()}) for d, c in chance.items()}
    return result, curves, queries


def zero_shot(encoder: Encodes, curated: Path, name: str, templates: Sequence) -> tuple[dict, dict]:
    rows = _manifest(manifest(curated, name), ["key", "shard", "label"])
    classnames = read_classnames(curated, name)
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise InputError(f"{name}: labels outside the {len(classnames)} class names")
    img = encoder.images(curated, [r["key"] for r in rows], [r["shard"] for r in rows], f"{name} images")
    classes = encoder.classes(classnames, templates)
    n = len(classnames)
    result = {
        "images": len(rows),
        "classes": n,
        "templates": len(templates),
        **_round(metrics.zero_shot_metrics(img, classes, labels, TOP_KS)),
        "chance": _round({f"top{k}": min(k, n) / n for k in TOP_KS}),
    }
    places = metrics.zero_shot_ranks(img, classes, labels)[:, 0]
    return result, _queries(name, "zero_shot", places, top=metrics.top_candidates(img, classes, TOP_SHOWN))


def probe(encoder: Encodes, curated: Path, name: str) -> tuple[dict, dict]:
    """A compositional probe (SugarCrepe's format): each image embedded once, however many items
    name it; accuracy per category and their mean. Beside them, the text side's ceiling: the mean
    cosine of each item's true caption and its negative in the (frozen) text tower. Near 1 the
    two captions are one point to the text tower, and no image embedding can tell them apart."""
    columns = ["category", "key", "shard", "caption", "negative_caption"]
    rows = _manifest(manifest(curated, name), columns)
    first: dict[str, str] = {}
    for r in rows:
        first.setdefault(r["key"], r["shard"])
    keys = list(first)
    img = encoder.images(curated, keys, [first[k] for k in keys], f"{name} images")
    where = {k: i for i, k in enumerate(keys)}
    pos = encoder.texts([r["caption"] for r in rows], f"{name} captions")
    neg = encoder.texts([r["negative_caption"] for r in rows], f"{name} negatives")
    categories = [r["category"] for r in rows]
    item_images = img[[where[r["key"]] for r in rows]]
    accuracy = metrics.probe_accuracy(item_images, pos, neg, categories)
    counts = {c: categories.count(c) for c in sorted(set(categories))}
    result = {
        "images": len(keys),
        "items": counts,
        "accuracy": _round(accuracy),
        "chance": 0.5,
        "text_cosine": _round(metrics.probe_text_cosine(pos, neg, categories)),
    }
    places = metrics.probe_places(item_images, pos, neg)
    return result, _queries(name, "probe", places, categories)


def evaluate(encoder: Encodes, curated: Path | str, datasets: Sequence[str], prompts: str) -> Evaluation:
    """Embed and score every data set in `datasets` (names from DATASETS) with one model."""
    curated = Path(curated)
    templates = prompt_templates(prompts)
    check_built(curated, datasets)
    missing = [p for p in required_files(curated, datasets) if not p.is_file()]
    if missing:
        raise MissingOutput(
            "curated evaluation files not found: " + ", ".join(map(str, missing)) + "; run the curate stage"
        )
    out = Evaluation(metrics={"retrieval": {}, "zeroshot": {}, "probe": {}}, curves={}, seconds={})
    for name in datasets:
        start = time.perf_counter()
        if name in RETRIEVAL_SETS or name in VAL_SETS:
            kind = "retrieval"
            out.metrics[kind][name], curves, per_direction = retrieval(encoder, curated, name)
            out.curves.update(curves)
            out.queries += per_direction
        elif name in PROBE_SETS:
            kind = "probe"
            out.metrics[kind][name], one = probe(encoder, curated, name)
            out.queries.append(one)
        else:
            kind = "zeroshot"
            out.metrics[kind][name], one = zero_shot(encoder, curated, name, templates)
            out.queries.append(one)
        out.seconds[name] = round(time.perf_counter() - start, 2)
        out.images += out.metrics[kind][name]["images"]
    out.metrics = {k: v for k, v in out.metrics.items() if v}
    return out


QUERY_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),  # text_to_image, image_to_text, zero_shot, probe
        pa.field("category", pa.string()),  # the probe's category; null elsewhere
        pa.field("query", pa.int32(), nullable=False),  # in the set's manifest order
        pa.field("place", pa.int32(), nullable=False),  # of the best positive, 0 for the top
        # The TOP_SHOWN best candidates, best first, by their index in the set's manifest order
        # (images, captions in manifest order, or class ids); null for the probe.
        pa.field("top", pa.list_(pa.int32())),
    ]
)


def queries_table(evaluation: Evaluation) -> pa.Table:
    """Every query's place, one row per query (QUERY_SCHEMA)."""
    columns = {f.name: [v for q in evaluation.queries for v in q[f.name]] for f in QUERY_SCHEMA}
    return pa.table(columns, schema=QUERY_SCHEMA)


def curve_rows(curves: dict[str, list[float]]) -> list[dict]:
    """Recall@k curves as rows {k, <set>_<direction>: recall, …} for a `dvc plots` table."""
    depth = max((len(c) for c in curves.values()), default=0)
    return [{"k": k + 1, **{name: c[k] for name, c in curves.items()}} for k in range(depth)]


def images_per_second(evaluation: Evaluation) -> float:
    total = sum(evaluation.seconds.values())
    return evaluation.images / total if total > 0 else math.nan
