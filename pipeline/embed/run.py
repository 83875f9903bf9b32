"""embed over every shard, resumable: parts under scratch/<run key>/, made on a backend (here, or
Ray workers: pipeline.backend), assembled into the output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import images, parallel, parts, regions
from pipeline.backend import LOCAL, Backend
from pipeline.embed.plan import Detection, Plan, ShardPlan, read_detections
from pipeline.embed.shard import Part, Stored, embed_shard
from pipeline.embed.tables import TABLES, EmbedError, Settings, schemas
from pipeline.files import atomic_dir, file_digest
from pipeline.models import clip
from pipeline.models.clip import Encoder
from pipeline.shards import ShardWriter
from pipeline.tables import concat_parquet, write_table


def run_key(encoder: Encoder, settings: Settings) -> str:
    """Hash of everything but the inputs that the outputs depend on."""
    import open_clip
    import PIL

    from pipeline.embed import plan, shard, tables

    modules = (sys.modules[__name__], shard, plan, tables, regions, clip, images, ShardWriter.__module__)
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
    }
    return parts.run_key(spec, modules)


def _detections_digest(dets: dict[str, Detection]) -> str:
    h = hashlib.sha256()
    for key in sorted(dets):
        d = dets[key]
        h.update(json.dumps([key, d.width, d.height, d.class_names, d.reject]).encode())
        for a in (d.boxes, d.confidences, d.classes):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_part(folder: Path, part: Part) -> None:
    """The part's tables and teacher shard into the (fresh) `folder`."""
    for name, table in part.tables.items():
        write_table(folder / f"{name}.parquet", table, table.schema)
    with ShardWriter(folder / "teacher", max_count=max(1, len(part.teacher))) as writer:
        for key, fields in part.teacher:
            writer.write(key, fields)


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


class Worker(parts.PartMaker):
    """An embed worker (pipeline.backend): its CLIP encoder, loaded once, and its crop threads."""

    def __init__(self, encoder: Encoder | Callable[[], Encoder], settings: Settings, threads: parallel.Count):
        self.encoder = encoder if isinstance(encoder, Encoder) else encoder()
        self.settings = settings
        self._stack = ExitStack()
        self.pool = self._stack.enter_context(parallel.pool(threads, "threads", name="crop"))

    def key(self) -> str:
        return run_key(self.encoder, self.settings)

    def dim(self) -> int:
        return self.encoder.dim

    def make(
        self,
        tmp: Path,
        shard: str,
        plan: ShardPlan,
        dets: dict[str, Detection],
        homes: dict[str, str],
        *,
        progress: Callable[[int], None],
    ) -> None:
        """The part of `shard`; `homes` maps the shards whose parts hold some of its images to
        those parts (made before this one)."""

        def elsewhere(wanted: dict[str, set[str]]) -> dict[str, Stored]:
            found: dict[str, Stored] = {}
            for home, imgs in sorted(wanted.items()):
                if home not in homes:
                    raise EmbedError(
                        f"images {sorted(imgs)[:3]} are encoded in shard {home}, which was not embedded"
                    )
                found.update(read_stored(Path(homes[home]), imgs))
            return found

        part = embed_shard(
            Path(shard), dets, plan, self.encoder, self.settings, self.pool, elsewhere, progress
        )
        write_part(tmp, part)

    def close(self) -> None:
        self._stack.close()


def embed(
    shards: list[Path],
    manifest: Path,
    regions_table: Path,
    out: Path,
    scratch: Path,
    encoder: Encoder | Callable[[], Encoder],
    settings: Settings,
    workers: parallel.Count = 2,
    progress: bool = True,
    backend: Backend = LOCAL,
) -> dict:
    """Embeddings of every shard's pairs into `out` (see the module doc), resuming from the parts
    in `scratch`; returns the counts for the metrics file. Other runs' parts are removed once
    `out` is whole. `encoder` is the model, or on the Ray backend a picklable function that
    loads it. A shard whose images were first encoded in earlier shards waits for their parts."""
    if backend.kind != "local" and isinstance(encoder, Encoder):
        raise TypeError("the Ray backend loads the model on its workers: pass a function that loads it")
    plan = Plan.read(manifest)
    absent = sorted(set(plan.shard_names()) - {s.name for s in shards})
    if absent:
        raise EmbedError(f"{manifest}: lists pairs in shard(s) {absent[:3]} that are not among the shards")
    bar = tqdm(desc="embed", unit="pair", disable=not progress)
    with backend.start(partial(Worker, encoder, settings, workers)) as pool:
        store = parts.Parts(scratch, pool.ask("key"), folders=True)
        dim = pool.ask("dim")
        part_of: dict[str, str] = {}  # shard name → its part's name
        jobs, pairs = [], {}
        for shard in shards:
            sp = plan.shard(shard.name)
            if not sp.image:
                raise EmbedError(
                    f"{manifest}: no pairs of shard {shard.name}; the manifest and shards differ"
                )
            dets = read_detections(regions_table, shard.name)
            homes = sorted({h for h in sp.home.values() if h != shard.name and h in part_of})
            digest = hashlib.sha256(
                json.dumps(
                    [file_digest(shard), _detections_digest(dets), sp.digest(), [part_of[h] for h in homes]]
                ).encode()
            ).hexdigest()[:16]
            part_of[shard.name] = name = f"{shard.stem}-{digest}"
            where = {h: str(store.path(part_of[h])) for h in homes}
            after = tuple(part_of[h] for h in homes)
            jobs.append(parts.Job(name, (str(shard), sp, dets, where), after))
            pairs[name] = len(sp.image)
        for job, reused in store.compute(jobs, pool, bar.update):
            if reused:
                bar.update(pairs[job.name])
            bar.set_postfix(shards=f"{len(store.used)}/{len(shards)}", reused=store.reused)
    bar.close()
    assemble(out, [(s.name, store.path(part_of[s.name])) for s in shards], dim)
    store.prune()
    return summarise(out, len(shards))


def assemble(out: Path, part_folders: list[tuple[str, Path]], dim: int) -> None:
    """Stream the parts into `out`: the tables concatenated, the teacher shards linked under
    their curated shard's name; `out` is replaced only once complete."""
    with atomic_dir(out) as tmp:
        for name, schema in schemas(dim).items():
            concat_parquet(tmp / f"{name}.parquet", [p / f"{name}.parquet" for _, p in part_folders], schema)
        (tmp / "teacher").mkdir()
        for shard, p in part_folders:
            for src in sorted((p / "teacher").glob("*.tar")):  # none when every pair was rejected
                _link_or_copy(src, tmp / "teacher" / shard)


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
