"""Where the raw data is: every raw input resolved from the sources params."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Mix, Sources


# --- where the raw data is -----------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePaths:
    """Every raw input curate will read, resolved; None where the params switch it off (the source
    is null, or the mix asks no pairs of a training-only input). `KEYS` names each by its params key
    for error messages."""

    coco_images: Path | None = None
    coco_train_annotations: Path | None = None
    coco_karpathy: Path | None = None
    flickr30k_images: Path | None = None
    flickr30k_karpathy: Path | None = None
    cc_shards: Path | None = None
    imagenet_val: Path | None = None
    cifar10: Path | None = None
    cifar100: Path | None = None
    sugarcrepe_annotations: Path | None = None
    sugarcrepe_images: Path | None = None
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
    def resolve(cls, sources: Sources, base_dir: Path | str, mix: Mix) -> SourcePaths:
        """The inputs `sources` names that a run with training `mix` reads. The config rules
        (pipeline/config_rules.py) have checked that what an enabled source needs is named."""
        base = Path(base_dir)
        k = sources.karpathy
        folder = base / k.folder if k is not None else None

        def in_karpathy(name: str | None) -> Path | None:
            return folder / name if folder is not None and name else None

        coco, flickr, cc = sources.coco, sources.flickr30k, sources.cc
        coco_train = coco.train_annotations if coco is not None and mix.coco > 0 else None
        return cls(
            coco_images=base / coco.images if coco is not None else None,
            coco_train_annotations=base / coco_train if coco_train else None,
            coco_karpathy=in_karpathy(k.coco) if k is not None and coco is not None else None,
            flickr30k_images=base / flickr.images if flickr is not None else None,
            flickr30k_karpathy=in_karpathy(k.flickr30k) if k is not None and flickr is not None else None,
            cc_shards=base / cc.shards if cc is not None and mix.cc > 0 else None,
            imagenet_val=base / sources.imagenet.val if sources.imagenet is not None else None,
            cifar10=base / sources.cifar10.folder if sources.cifar10 is not None else None,
            cifar100=base / sources.cifar100.folder if sources.cifar100 is not None else None,
            sugarcrepe_annotations=(
                base / sources.sugarcrepe.annotations if sources.sugarcrepe is not None else None
            ),
            sugarcrepe_images=base / sources.sugarcrepe.images if sources.sugarcrepe is not None else None,
            coco_test=in_karpathy(k.coco_test) if k is not None and coco is not None else None,
            flickr30k_test=in_karpathy(k.flickr30k_test) if k is not None and flickr is not None else None,
        )

    def named(self) -> list[tuple[str, Path]]:
        """(params key, path) of every input the run reads."""
        paths = ((key, getattr(self, name)) for name, key in self.KEYS.items())
        return [(key, path) for key, path in paths if path is not None]

    def missing(self) -> list[tuple[str, Path]]:
        """(params key, path) of every input that does not exist."""
        return [(key, path) for key, path in self.named() if not path.exists()]
