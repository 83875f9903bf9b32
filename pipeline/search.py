"""Text-to-image search over any folder of images with any open_clip checkpoint (`dclip search`).

The folder is embedded once and the index kept on disk, keyed by content: the checkpoint's
identity and every image's path and sha256. An unchanged folder reuses it; a changed, added or
removed file gives another key and a new index. A file that cannot be decoded is left out and
named (`Index.rejected`), never embedded as something else.

Search is exact (one matrix product, `torch.topk`) below APPROXIMATE_FROM images, and from there an
approximate HNSW index (usearch, cosine, M 32, ef 256) built once beside the embeddings. Measured
on this machine (2 cores, 512-d, benchmarks/search_crossover.py): an exact query takes 2.9 ms at
10,000 images and 6.6 ms at 30,000, growing linearly; HNSW at a recall@5 worth having (0.98 at
10,000) takes 3.9 and 7.5 ms, so it does not pay there (usearch's defaults are faster but found
0.52 of the true top 5 at 10,000 and 0.12 at 100,000 on random vectors), and its build costs
19 s and 113 s. Exact search stays under about 25 ms per query up to 100,000 images: the
approximate index starts there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import images
from pipeline.files import atomic_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
APPROXIMATE_FROM = 100_000  # images; below it exact search is as fast (benchmarks/search_crossover.py)
HNSW_CONNECTIVITY, HNSW_EXPANSION = 32, 256  # recall over speed (usearch's defaults: 16, 128/64)
INDEX_VERSION = 1  # part of the key: a change of what an index holds makes old ones stale


@dataclass(frozen=True)
class Index:
    folder: Path
    key: str
    paths: list[str]  # relative to the folder, sorted
    embeddings: np.ndarray  # (n, d) float32, unit rows, in `paths` order
    rejected: list[tuple[str, str]]  # (path, why) of the files left out
    built: bool  # False: read back from the cache


@dataclass(frozen=True)
class Hit:
    path: str
    score: float  # cosine similarity
    rank: int  # 0 for the best


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder` (by suffix, any case), sorted by relative path."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def content_key(model_id: str, folder: Path, files: Sequence[Path]) -> str:
    """sha256 over the model's identity and each image's relative path and content."""
    h = hashlib.sha256(json.dumps({"model": model_id, "version": INDEX_VERSION}).encode())
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def build_index(
    folder: Path,
    model_id: str,
    encode_images: Callable[[list[torch.Tensor]], torch.Tensor],
    preprocess: Callable,
    cache: Path,
    batch_size: int = 64,
    progress: bool = False,
) -> Index:
    """The folder's index from `cache` when its content key is there, else embedded now (in
    batches through `preprocess` and `encode_images`) and written there atomically."""
    from tqdm import tqdm

    files = image_files(folder)
    key = content_key(model_id, folder, files)
    stored = cache / f"{key}.npz"
    if stored.is_file():
        with np.load(stored, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return Index(
                folder, key, meta["paths"], z["embeddings"], [tuple(r) for r in meta["rejected"]], False
            )
    paths: list[str] = []
    rejected: list[tuple[str, str]] = []
    chunks: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            emb = encode_images(batch).float()
            chunks.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
            batch.clear()

    for p in tqdm(files, desc="index", disable=not progress, leave=False):
        rel = p.relative_to(folder).as_posix()
        try:
            img = images.decode(p.read_bytes())
        except images.ImageReject as err:
            rejected.append((rel, f"{err.reason}: {err}"))
            continue
        paths.append(rel)
        batch.append(preprocess(img))
        if len(batch) == batch_size:
            flush()
    flush()
    if not paths:
        raise ValueError(f"{folder}: no image could be decoded ({len(rejected)} file(s) refused)")
    embeddings = np.concatenate(chunks).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_file(stored) as tmp, open(tmp, "wb") as f:
        meta = json.dumps({"paths": paths, "rejected": rejected, "model": model_id})
        np.savez(f, embeddings=embeddings, meta=np.array(meta))
    return Index(folder, key, paths, embeddings, rejected, True)


def search(
    index: Index, queries: torch.Tensor, k: int, approximate: bool | None = None, cache: Path | None = None
) -> list[list[Hit]]:
    """The k best images of each query embedding (rows of `queries`), best first. `approximate`
    None: exact below APPROXIMATE_FROM images, HNSW from there (kept in `cache` when given)."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1).cpu().numpy()
    n = len(index.paths)
    k = min(k, n)
    if approximate is None:
        approximate = n >= APPROXIMATE_FROM
    if approximate:
        found = _hnsw(index, cache).search(q, k)
        keys, distances = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
        scores = 1.0 - distances  # usearch's cosine distance is 1 - cosine
    else:
        sims = torch.from_numpy(q) @ torch.from_numpy(index.embeddings).T
        top = torch.topk(sims, k, dim=1)
        keys, scores = top.indices.numpy(), top.values.numpy()
    return [
        [Hit(index.paths[int(i)], float(s), r) for r, (i, s) in enumerate(zip(row_keys, row_scores))]
        for row_keys, row_scores in zip(keys, scores)
    ]


def _hnsw(index: Index, cache: Path | None):  # -> usearch.index.Index
    from usearch.index import Index as Hnsw

    stored = cache / f"{index.key}.usearch" if cache is not None else None
    hnsw = Hnsw(
        ndim=index.embeddings.shape[1],
        metric="cos",
        dtype="f32",
        connectivity=HNSW_CONNECTIVITY,
        expansion_add=HNSW_EXPANSION,
        expansion_search=HNSW_EXPANSION,
    )
    if stored is not None and stored.is_file():
        hnsw.load(str(stored))
        return hnsw
    hnsw.add(np.arange(len(index.paths)), index.embeddings)
    if stored is not None:
        with atomic_file(stored) as tmp:
            hnsw.save(str(tmp))
    return hnsw


def contact_sheet(index: Index, queries: Sequence[str], hits: Sequence[Sequence[Hit]]) -> str:
    """A self-contained HTML page: each query with its hits as inlined thumbnails and scores."""
    import html

    from PIL import Image

    from pipeline.report_html import thumbnail_uri

    def thumb(rel: str) -> str:
        with Image.open(index.folder / rel) as im:
            return thumbnail_uri(im, 160)

    rows = []
    for text, found in zip(queries, hits):
        cells = "".join(
            f'<figure><img src="{thumb(h.path)}" alt="{html.escape(h.path)}">'
            f"<figcaption>{h.rank + 1}. {h.score:.3f}<br>{html.escape(h.path)}</figcaption></figure>"
            for h in found
        )
        rows.append(f"<h2>“{html.escape(text)}”</h2><div class='hits'>{cells}</div>")
    style = (
        "body{font:14px system-ui,sans-serif;margin:2em} .hits{display:flex;flex-wrap:wrap;gap:8px}"
        " figure{margin:0;width:170px} figcaption{font-size:11px;word-break:break-all}"
    )
    title = f"dclip search: {len(index.paths)} images of {html.escape(str(index.folder))}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body><h1>{title}</h1>{''.join(rows)}</body></html>\n"
    )
