"""`dclip search`: the images of any folder that best match some text, by any open_clip checkpoint
(the student, the base, an open_clip tag); the folder's index is built once and kept by content."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline import search
from pipeline.config import load_params
from pipeline.errors import InputError
from pipeline.files import atomic_file
from pipeline.models.clip import load_encoder


def run(
    queries: list[str],
    images: Path,
    weights: str,
    params_file: Path = Path("params.yaml"),
    model: str | None = None,
    top_k: int = 5,
    html: Path | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> list[list[search.Hit]]:
    """Print each query's top_k images (rank, cosine, path); with `html`, a contact sheet too.
    The architecture is `model`, else the params' clip.model; runtime.device picks the device."""
    if not queries:
        raise InputError("no query: give one or more texts, or --queries-file")
    params = load_params(params_file, only=("clip", "runtime"))
    root = params_file.parent
    architecture = model or params.clip.model
    encoder = load_encoder(architecture, weights, params.runtime.device, base_dir=root)
    cache = cache if cache is not None else root / params.runtime.scratch / "search"
    index = search.build_index(
        images,
        f"{architecture}|{encoder.digest}",
        lambda batch: encoder.encode_images(torch.stack(batch)),
        encoder.preprocess,
        cache,
        batch_size=params.runtime.batch_size.evaluate,
        progress=progress,
    )
    state = "built" if index.built else "reused"
    print(f"index {index.key[:12]} ({state}): {len(index.paths)} images of {images}", file=sys.stderr)
    for path, why in index.rejected:
        print(f"  left out {path}: {why}", file=sys.stderr)
    hits = search.search(index, encoder.encode_texts(queries, normalize=True), top_k, cache=cache)
    for text, found in zip(queries, hits):
        print(text)
        for h in found:
            print(f"  {h.rank + 1}\t{h.score:.4f}\t{h.path}")
    if html is not None:
        with atomic_file(html) as tmp:
            tmp.write_text(search.contact_sheet(index, queries, hits), encoding="utf-8")
    return hits
