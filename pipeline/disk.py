"""How much disk the current params will need, before hours are spent filling it (`dclip doctor`).

An upper-bound estimate from the params alone, for the outputs that grow with the data:

- curated training shards: one JPEG per pair (a pair's sample carries its image) at
  `curate.image_size` on the short side and a 4:3 frame, at JPEG_BYTES_PER_PIXEL;
- the embed cache: per pair, the caption's token embeddings at the full context length, the
  whole image and `detect.max_regions` regions, the pooled image and caption embeddings, all
  float16, written twice (the Parquet tables and the teacher-ready shards);
- the scratch parts of a run in progress: as large again as the embed cache at most.

DVC's cache holds a second copy of every output unless the cache links (docs/real-data.md);
`with_dvc_cache` counts it. Evaluation sets, weights and the raw data are left out: their size
is the data's, already on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

# JPEG at quality 90 on natural photos: 2-4 bits per pixel; the upper end. (The demo's drawn
# shapes compress to about 0.26 bytes per pixel.)
JPEG_BYTES_PER_PIXEL = 0.5
ASPECT = 4 / 3  # stored frames are resized on their short side
FLOAT16 = 2


@dataclass(frozen=True)
class Need:
    pairs: int
    curated_bytes: int
    embed_bytes: int
    scratch_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.curated_bytes + self.embed_bytes + self.scratch_bytes

    def with_dvc_cache(self) -> int:
        """Outputs and their copies in a copying DVC cache (scratch is not cached)."""
        return self.total_bytes + self.curated_bytes + self.embed_bytes


def estimate(pairs: int, image_size: int, width: int, context: int, max_regions: int) -> Need:
    """The disk a run over `pairs` training pairs needs: stored images `image_size` px on the short
    side, embeddings `width` wide, captions up to `context` tokens, up to `max_regions` boxes."""
    if min(pairs, image_size, width, context) < 0 or max_regions < 0:
        raise ValueError("sizes must not be negative")
    image = image_size * image_size * ASPECT * JPEG_BYTES_PER_PIXEL
    vectors = context + (1 + max_regions) + 2  # tokens, whole image and regions, pooled pair
    embed = 2 * vectors * width * FLOAT16  # tables and teacher shards
    return Need(
        pairs=pairs,
        curated_bytes=round(pairs * image),
        embed_bytes=round(pairs * embed),
        scratch_bytes=round(pairs * embed),
    )
