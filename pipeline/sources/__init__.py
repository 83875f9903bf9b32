"""Readers of the raw datasets in their real formats.

Each reader checks what it reads: a malformed annotation raises SourceError naming the file and the
key. Images are never loaded in bulk: the readers give paths, or stream shards one sample at a time.
"""

from pipeline.sources.cifar import read_cifar
from pipeline.sources.clip_benchmark import TestImage, read_coco_test_karpathy, read_flickr30k_test_karpathy
from pipeline.sources.coco import CocoImage, index_images, read_captions
from pipeline.sources.errors import SourceError
from pipeline.sources.imagenet import read_imagenet_val, read_synset_mapping
from pipeline.sources.img2dataset import WebSample, iter_shards, read_failures
from pipeline.sources.karpathy import KarpathyImage, read_karpathy
from pipeline.sources.sugarcrepe import ProbeItem, read_sugarcrepe

__all__ = [
    "CocoImage",
    "KarpathyImage",
    "ProbeItem",
    "SourceError",
    "TestImage",
    "WebSample",
    "index_images",
    "iter_shards",
    "read_captions",
    "read_cifar",
    "read_coco_test_karpathy",
    "read_failures",
    "read_flickr30k_test_karpathy",
    "read_imagenet_val",
    "read_karpathy",
    "read_sugarcrepe",
    "read_synset_mapping",
]
