"""Evaluate a CLIP checkpoint on the curated evaluation sets: Karpathy val and test retrieval
(COCO, Flickr30k; val sets are named `<set>_val`), zero-shot classification (ImageNet, CIFAR-10,
CIFAR-100) and the compositional probe.

Besides the metrics, every query's outcome is kept (`Evaluation.queries`): the place of its best
positive, 0 for the top — a caption's image, an image's best caption, an image's class, a probe
item's true caption against its negative. Every metric here is a mean over queries of a function
of that place, so a study can bootstrap intervals over queries and pair two models on the same
queries (pipeline/study.py). Beside it, the query's best few candidates (what the report's gallery
shows).

Images stream from the curated WebDataset shards through a DataLoader (decoding in worker
processes, each taking every n-th sample, so any number of shards keeps every worker busy) into
batched `encode_image`; CUDA with autocast when the device is a GPU, float32 on CPU. Only the
embeddings are kept, in manifest order; the metrics are those of pipeline.metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline import images, metrics
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


class ShardImages(IterableDataset):
    """(manifest index, preprocessed image) for every sample of the shards, in shard order.

    Worker w of W decodes samples w, w + W, …: the tar stream is read by every worker (cheap),
    the decoding is shared evenly whatever the number of shards."""

    def __init__(self, root: Path, shards: Sequence[str], index: dict[str, int], transform: Callable):
        self.root, self.shards, self.index, self.transform = Path(root), list(shards), index, transform

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = 0
        for shard in self.shards:
            path = self.root / shard
            for key, sample in read_shard(path):
                if key not in self.index:
                    raise InputError(f"{path}: sample {key!r} is not in the set's manifest")
                mine, n = n % workers == worker, n + 1
                if not mine:
                    continue
                if images.image_member(sample) is None:
                    raise InputError(f"{path}: sample {key!r} has no image ({', '.join(sorted(sample))})")
                img = images.decode_sample(sample)
                if isinstance(img, images.Reject):
                    raise InputError(f"{path}: sample {key!r}: {img.reason}: {img.detail}")
                yield self.index[key], self.transform(img)


# --- the encoder ---------------------------------------------------------------------------------


@dataclass
class SetEncoder:
    """Whole evaluation sets through a CLIP encoder, batched: images read and decoded from their
    shards by DataLoader workers. Every embedding L2-normalised float32 on the CPU."""

    encoder: clip.Encoder
    batch_size: int
    workers: int  # decoding processes; 0 or 1: in this process (as pipeline.parallel's pools)
    progress: bool = True

    def images(
        self, root: Path, keys: Sequence[str], shards: Sequence[str], desc: str = "images"
    ) -> torch.Tensor:
        """Embeddings of the images `keys` (found in `shards`, paths relative to root), in the
        order of `keys`. Every key must be in the shards and every shard sample among the keys."""
        index = {key: i for i, key in enumerate(keys)}
        if len(index) != len(keys):
            raise InputError(f"{desc}: the manifest lists a key twice")
        dataset = ShardImages(root, list(dict.fromkeys(shards)), index, self.encoder.preprocess)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.workers if self.workers > 1 else 0,
            pin_memory=self.encoder.device.type == "cuda",
        )
        out: torch.Tensor | None = None
        seen = torch.zeros(len(keys), dtype=torch.bool)
        with tqdm(total=len(keys), desc=desc, disable=not self.progress, leave=False) as bar:
            for idx, pixels in loader:
                emb = self.encoder.encode_images(pixels, normalize=True)
                if out is None:
                    out = torch.empty(len(keys), emb.shape[1])
                if seen[idx].any():
                    raise InputError(f"{desc}: a key appears in more than one sample of the shards")
                out[idx], seen[idx] = emb, True
                bar.update(len(idx))
        if out is None or not seen.all():
            missing = [keys[i] for i in (~seen).nonzero()[:3, 0].tolist()]
            raise InputError(
                f"{desc}: {int((~seen).sum())} manifest key(s) not in the shards, e.g. {missing}"
            )
        return out

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


def retrieval(
    encoder: SetEncoder, curated: Path, name: str
) -> tuple[dict, dict[str, list[float]], list[dict]]:
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


def zero_shot(encoder: SetEncoder, curated: Path, name: str, templates: Sequence) -> tuple[dict, dict]:
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


def probe(encoder: SetEncoder, curated: Path, name: str) -> tuple[dict, dict]:
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


def evaluate(encoder: SetEncoder, curated: Path | str, datasets: Sequence[str], prompts: str) -> Evaluation:
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
