"""Training selection: candidates tried in rank order until each source's count survives."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import images
from pipeline.captions import CaptionCheck, TokenCounter, check_captions
from pipeline.curate.decode import Decoder, Spill, Stored
from pipeline.curate.keys import KeyRegistry, key_stem, pick_caption, rank
from pipeline.curate.tables import Ledger
from pipeline.images import Reject
from pipeline.sources import (
    SourceError,
    iter_shards,
    read_failures,
)

# --- training selection ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    source: str
    id: str
    stem: str  # key part
    captions: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Pair:
    key: str
    image: str
    source: str
    id: str
    caption_index: int
    caption: str
    stored: Stored


@dataclass
class SourceStats:
    asked: int
    candidates: int = 0
    tried: int = 0
    images: int = 0
    pairs: int = 0


@dataclass
class Selection:
    """Selection state shared by the training sources: held-out and kept hashes, kept pairs."""

    seed: int
    captions_per_image: int | str
    count_tokens: TokenCounter
    max_tokens: int
    ledger: Ledger
    spill: Spill
    heldout: dict[str, str] = field(default_factory=dict)  # content hash → which held-out image
    kept_hashes: dict[str, str] = field(default_factory=dict)  # content hash → kept image key
    pairs: list[Pair] = field(default_factory=list)
    stats: dict[str, SourceStats] = field(default_factory=dict)
    keys: KeyRegistry = field(default_factory=KeyRegistry)

    def check(self, cand: Candidate) -> CaptionCheck:
        return check_captions(cand.captions, self.count_tokens, self.max_tokens)

    def need(self, source: str) -> int:
        st = self.stats[source]
        return st.asked - st.pairs

    def take(
        self, cand: Candidate, check: CaptionCheck, result: images.Prepared | Stored | Reject | None
    ) -> None:
        """Decide one candidate, in rank order: record its refusals, or keep it."""
        source, ledger = cand.source, self.ledger
        st = self.stats[source]
        st.tried += 1
        for ref in check.refused:
            ledger.refuse(source, cand.id, ref.reason, ref.detail)
        if not check.kept:
            ledger.refuse(
                source, cand.id, "no_valid_caption", f"none of {len(cand.captions)} captions usable"
            )
            return
        if isinstance(result, Reject):
            ledger.refuse(source, cand.id, result.reason, result.detail)
            return
        if result is None:  # pragma: no cover - a job with captions always gets a payload or refusal
            raise AssertionError(f"{source} {cand.id}: no decode result")
        digest = result.content_hash
        if digest in self.heldout:
            ledger.refuse(source, cand.id, "heldout_hash", f"same pixels as {self.heldout[digest]}")
            return
        if digest in self.kept_hashes:
            ledger.refuse(source, cand.id, "duplicate", f"same pixels as {self.kept_hashes[digest]}")
            return
        stored = self.spill.store(result) if isinstance(result, images.Prepared) else result
        image_key = self.keys.key(source, cand.id, cand.stem)
        self.kept_hashes[digest] = image_key
        if self.captions_per_image == 1:
            chosen = [check.kept[pick_caption(self.seed, source, cand.id, len(check.kept))]]
        else:
            chosen = list(check.kept[: self.need(source)])
        for index, text in chosen:
            self.pairs.append(Pair(f"{image_key}-{index}", image_key, source, cand.id, index, text, stored))
        st.images += 1
        st.pairs += len(chosen)


def select_listed(
    sel: Selection,
    decoder: Decoder,
    fn: Callable,
    ranked: list[tuple[Candidate, Path | None]],
    progress: bool,
) -> None:
    """COCO and Flickr30k: candidates listed up front (path or None when the file is missing),
    tried in rank order until the source's count is met."""
    if not ranked:
        return
    source = ranked[0][0].source
    if sel.need(source) <= 0:
        return

    def jobs() -> Iterator[tuple[Any, Any]]:
        for cand, path in ranked:
            check = sel.check(cand)
            if not check.kept:
                yield (cand, check, None), None
            elif path is None:
                missing = Reject("missing_file", f"no image file for id {cand.id}")
                yield (cand, check, missing), None
            else:
                yield (cand, check, None), str(path)

    bar = tqdm(total=sel.stats[source].asked, desc=f"curate {source}", disable=not progress, leave=False)
    with bar:
        for (cand, check, refusal), result in decoder.map(fn, jobs()):
            before = sel.stats[source].pairs
            sel.take(cand, check, refusal or result)
            bar.update(sel.stats[source].pairs - before)
            if sel.need(source) <= 0:
                break


def select_cc(sel: Selection, decoder: Decoder, fn: Callable, folder: Path, progress: bool) -> None:
    """Conceptual Captions from img2dataset shards, streamed in rounds. Each round: pass 1 keeps
    the best-ranked keys not yet tried (a heap of the window's size), pass 2 decodes just those
    into the spill file, then they are decided in rank order. One round suffices unless more than
    the margin is refused."""
    source, ledger, st = "cc", sel.ledger, sel.stats["cc"]
    failed: set[str] = set()
    for row in read_failures(folder):
        ledger.refuse(source, row["key"], row["status"], f"{row['shard']}.parquet: {row['error_message']}")
        st.candidates += 1
        failed.add(row["key"])
    if st.asked == 0:
        return
    cutoff: str | None = None
    first = True
    while sel.need(source) > 0:
        need = sel.need(source)
        window_size = need + need // 8 + 16

        def ranked(first: bool = first, cutoff: str | None = cutoff) -> Iterator[tuple[str, str]]:
            for sample in iter_shards(folder):
                if sample.key in failed:  # img2dataset keeps a failed key's json: refused above
                    continue
                if first:
                    st.candidates += 1
                if sample.truncated is not None:
                    if first:
                        ledger.refuse(source, sample.key, "shard_truncated", sample.truncated)
                    continue
                if sample.image is None:
                    if first:
                        ledger.refuse(source, sample.key, "no_image", f"{sample.shard}.tar: no image member")
                    continue
                r = rank(sel.seed, source, sample.key)
                if cutoff is None or r > cutoff:
                    yield r, sample.key

        window = heapq.nsmallest(window_size, ranked())
        first = False
        if not window:
            break
        wanted = {key for _, key in window}
        found: dict[str, tuple[Candidate, CaptionCheck, Any]] = {}

        def jobs(wanted: set[str] = wanted, found: dict = found) -> Iterator[tuple[Any, Any]]:
            for sample in iter_shards(folder):
                if sample.key not in wanted:
                    continue
                if sample.key in found:
                    ledger.refuse(source, sample.key, "duplicate_key", f"{sample.shard}.tar: key seen before")
                    continue
                cand = Candidate(source, sample.key, key_stem(sample.key), (sample.caption,))
                check = sel.check(cand)
                found[sample.key] = (cand, check, None)
                yield (cand, check), sample.image if check.kept else None

        desc = f"curate cc (decode {len(window)})"
        for (cand, check), result in tqdm(
            decoder.map(fn, jobs()), total=len(window), desc=desc, disable=not progress, leave=False
        ):
            stored = sel.spill.store(result) if isinstance(result, images.Prepared) else result
            found[cand.id] = (cand, check, stored)
        decided: set[str] = set()
        for r, key in window:
            if key in decided:  # the same key in two shards: the second was refused above
                continue
            if key not in found:
                raise SourceError(f"{folder}: key {key!r} was read once and then not found")
            decided.add(key)
            cand, check, result = found.pop(key)
            sel.take(cand, check, result)
            if sel.need(source) <= 0:
                return
            cutoff = r
        if len(window) < window_size:
            break
