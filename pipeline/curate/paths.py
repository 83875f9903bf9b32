"""Where the raw data is: every raw input resolved from the sources params."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Sources


# --- where the raw data is -----------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePaths:
    """Every raw input, resolved; `keys` names each by its params key for error messages."""

    coco_images: Path
    coco_train_annotations: Path
    coco_karpathy: Path
    flickr30k_images: Path
    flickr30k_karpathy: Path
    cc_shards: Path
    imagenet_val: Path
    cifar10: Path
    cifar100: Path
    sugarcrepe_annotations: Path
    sugarcrepe_images: Path
    coco_test: Path | None = None  # CLIP_benchmark's files, when the test sets come from them
    flickr30k_test: Path | None = None

    KEYS = {
        "coco_images": "sources.coco.images",
        "coco_train_annotations": "sources.coco.train_annotations",
        "coco_karpathy": "sources.karpathy.coco",
        "flickr30k_images": "sources.flickr30k.images",
        "flickr30k_karpathy": "sources.karpathy.flickr30k",
        "cc_shards": "sources.cc.shards",
        "imagenet_val": "sources.imagenet.val",
        "cifar10": "sources.cifar10.folder",
        "cifar100": "sources.cifar100.folder",
        "sugarcrepe_annotations": "sources.sugarcrepe.annotations",
        "sugarcrepe_images": "sources.sugarcrepe.images",
        "coco_test": "sources.karpathy.coco_test",
        "flickr30k_test": "sources.karpathy.flickr30k_test",
    }

    @classmethod
    def resolve(cls, sources: Sources, base_dir: Path | str) -> SourcePaths:
        base = Path(base_dir)
        karpathy = base / sources.karpathy.folder
        return cls(
            coco_images=base / sources.coco.images,
            coco_train_annotations=base / sources.coco.train_annotations,
            coco_karpathy=karpathy / sources.karpathy.coco,
            flickr30k_images=base / sources.flickr30k.images,
            flickr30k_karpathy=karpathy / sources.karpathy.flickr30k,
            cc_shards=base / sources.cc.shards,
            imagenet_val=base / sources.imagenet.val,
            cifar10=base / sources.cifar10.folder,
            cifar100=base / sources.cifar100.folder,
            sugarcrepe_annotations=base / sources.sugarcrepe.annotations,
            sugarcrepe_images=base / sources.sugarcrepe.images,
            coco_test=karpathy / sources.karpathy.coco_test if sources.karpathy.coco_test else None,
            flickr30k_test=(
                karpathy / sources.karpathy.flickr30k_test if sources.karpathy.flickr30k_test else None
            ),
        )

    def named(self) -> list[tuple[str, Path]]:
        """(params key, path) of every input the params name."""
        paths = ((key, getattr(self, name)) for name, key in self.KEYS.items())
        return [(key, path) for key, path in paths if path is not None]

    def missing(self) -> list[tuple[str, Path]]:
        """(params key, path) of every input that does not exist."""
        return [(key, path) for key, path in self.named() if not path.exists()]
