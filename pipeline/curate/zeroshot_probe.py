"""The other evaluation sets: the compositional probe (SugarCrepe) and the zero-shot sets, in
CLIP_benchmark's layout (pipeline/evalsets.py)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

from PIL import Image
from tqdm import tqdm

from pipeline import evalsets
from pipeline.curate.decode import Decoder, prepare
from pipeline.curate.keys import KeyRegistry
from pipeline.curate.selection import Selection
from pipeline.curate.settings import Settings
from pipeline.curate.tables import PROBE_SCHEMA, ZEROSHOT_SCHEMA, Ledger
from pipeline.images import Reject
from pipeline.shards import ShardWriter
from pipeline.sources import (
    read_cifar,
    read_imagenet_val,
)
from pipeline.sources.sugarcrepe import ProbeItem
from pipeline.tables import write_table

# --- the compositional probe -------------------------------------------------------------------------


def write_probe(
    items: list[ProbeItem],
    folder: Path,
    out: Path,
    decoder: Decoder,
    cfg: Settings,
    sel: Selection,
    progress: bool,
) -> dict[str, Any]:
    """SugarCrepe's images (each once, however many items name it) as shards, and its items as a
    table; an item whose image is missing or unreadable is refused with the image."""
    ledger, keys = sel.ledger, KeyRegistry()
    names = list(dict.fromkeys(i.filename for i in items))
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    jobs = ((name, str(folder / name) if (folder / name).is_file() else None) for name in names)
    where: dict[str, tuple[str, str]] = {}
    folder_out = evalsets.shard_dir(out, "sugarcrepe", "test")
    with ShardWriter(folder_out, max_count=cfg.shard_size, pattern=evalsets.SHARD_PATTERN) as writer:
        for name, result in tqdm(
            decoder.map(prep, jobs), total=len(names), desc="sugarcrepe", disable=not progress, leave=False
        ):
            if result is None:
                ledger.refuse("sugarcrepe", name, "missing_file", f"no image file {folder / name}")
                continue
            if isinstance(result, Reject):
                ledger.refuse("sugarcrepe", name, result.reason, result.detail)
                continue
            sel.heldout.setdefault(result.content_hash, f"sugarcrepe {name}")
            key = keys.key("sugarcrepe", name)
            meta = {"source": "sugarcrepe", "id": name, "width": result.width, "height": result.height}
            shard = writer.write(key, {"jpg": result.jpeg, "json": meta})
            where[name] = (key, evalsets.shard_path("sugarcrepe", "test", shard))
        shards = writer.close()
    evalsets.write_shard_count(folder_out, shards)
    rows = [
        {
            "category": i.category,
            "index": i.index,
            "key": where[i.filename][0],
            "shard": where[i.filename][1],
            "caption": i.caption,
            "negative_caption": i.negative_caption,
        }
        for i in items
        if i.filename in where
    ]
    write_table(evalsets.manifest(out, "sugarcrepe"), rows, PROBE_SCHEMA)
    return {
        "images": len(where),
        "items": dict(sorted(Counter(r["category"] for r in rows).items())),
        "items_dropped": len(items) - len(rows),
        "rejected": ledger.split("sugarcrepe")[1],
    }


# --- zero-shot sets ---------------------------------------------------------------------------------


def _write_zeroshot(
    name: str,
    classnames: list[str],
    samples: Iterator[tuple[str, int, Any]],
    n: int,
    out: Path,
    shard_size: int,
    ledger: Ledger,
    progress: bool,
) -> dict[str, Any]:
    """samples: (id, label, (ext, bytes, meta) or Reject) in order."""
    keys, rows = KeyRegistry(), []
    folder = evalsets.shard_dir(out, name, "test")
    with ShardWriter(folder, max_count=shard_size, pattern=evalsets.SHARD_PATTERN) as writer:
        for image_id, label, result in tqdm(samples, total=n, desc=name, disable=not progress, leave=False):
            if isinstance(result, Reject):
                ledger.refuse(name, image_id, result.reason, result.detail)
                continue
            ext, data, meta = result
            key = keys.key(name, image_id)
            meta = {"source": name, "id": image_id, "label": label, "classname": classnames[label], **meta}
            shard = writer.write(key, {ext: data, "cls": str(label), "json": meta})
            path = evalsets.shard_path(name, "test", shard)
            rows.append({"key": key, "shard": path, "id": image_id, "label": label})
        shards = writer.close()
    evalsets.write_shard_count(folder, shards)
    evalsets.write_classnames(evalsets.set_dir(out, name), classnames)
    write_table(evalsets.manifest(out, name), rows, ZEROSHOT_SCHEMA)
    return {"images": len(rows), "classes": len(classnames), "rejected": ledger.split(name)[1]}


def write_imagenet(
    folder: Path, decoder: Decoder, cfg: Settings, out: Path, ledger: Ledger, progress: bool
) -> dict[str, Any]:
    classnames, samples = read_imagenet_val(folder)
    prep = partial(prepare, size=cfg.image_size, quality=cfg.jpeg_quality)
    jobs = (((f"{p.parent.name}/{p.name}", label), str(p)) for p, label in samples)

    def results() -> Iterator[tuple[str, int, Any]]:
        for (image_id, label), r in decoder.map(prep, jobs):
            if isinstance(r, Reject):
                yield image_id, label, r
            else:
                sizes = {
                    "original_width": r.original_width,
                    "original_height": r.original_height,
                    "width": r.width,
                    "height": r.height,
                }
                yield image_id, label, ("jpg", r.jpeg, sizes)

    return _write_zeroshot(
        "imagenet", classnames, results(), len(samples), out, cfg.shard_size, ledger, progress
    )


def encode_png(pixels: Any) -> bytes:
    """Lossless: a CIFAR image is 32×32 and stays as it was given (PIL's PNG has no timestamp)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_cifar(
    name: str, folder: Path, cfg: Settings, out: Path, ledger: Ledger, progress: bool
) -> dict[str, Any]:
    classnames, pixels, labels = read_cifar(folder, cast('Literal["cifar10", "cifar100"]', name), "test")

    def results() -> Iterator[tuple[str, int, Any]]:
        h, w = pixels.shape[1:3]
        sizes = {"original_width": w, "original_height": h, "width": w, "height": h}
        for i, label in enumerate(labels):
            yield f"{i:05d}", label, ("png", encode_png(pixels[i]), sizes)

    return _write_zeroshot(name, classnames, results(), len(labels), out, cfg.shard_size, ledger, progress)
