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

from pipeline.embed.plan import Detection, Plan, ShardPlan, read_detections
from pipeline.embed.run import assemble, embed, read_stored, run_key, summarise, write_part
from pipeline.embed.shard import Part, Prepared, Stored, embed_shard, prepare
from pipeline.embed.tables import DETECT_COLUMNS, MANIFEST_COLUMNS, TABLES, EmbedError, Settings, schemas

__all__ = [
    "DETECT_COLUMNS",
    "MANIFEST_COLUMNS",
    "TABLES",
    "Detection",
    "EmbedError",
    "Part",
    "Plan",
    "Prepared",
    "Settings",
    "ShardPlan",
    "Stored",
    "assemble",
    "embed",
    "embed_shard",
    "prepare",
    "read_detections",
    "read_stored",
    "run_key",
    "schemas",
    "summarise",
    "write_part",
]
