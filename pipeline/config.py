"""Typed, validated params.

One pydantic model per params section; `load_params` validates the whole file before any stage
does any work, and every problem is reported with its dotted key and the offending value.
Relative paths in params are relative to the params file's folder (the repository root).

Defaults have one home: every default here is params.yaml's value (the offline demo), and a test
keeps the two equal; the paper recipes in configs/ set every key. The library's step settings
(built by `settings` below) have no defaults of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ParamsError

Count = Annotated[int, Field(ge=0, strict=True)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


class Section(BaseModel):
    # Unknown keys are errors, and "3" is not silently taken for 3.
    # No inf or nan anywhere: a loss weight of .inf passes ge=0 and wrecks training hours later.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# --- world: the demo world generator ---------------------------------------------------------


class CocoWorld(Section):
    """COCO 2014 splits as Karpathy saw them; the files are written in the 2017 layout."""

    train2014: Count = 3000
    val2014: Count = 1750
    val2017: Count = 250  # of the val2014 images; the other val2014 images go to train2017
    karpathy_val: Count = 500  # of the val2014 images
    karpathy_test: Count = 1000  # of the val2014 images; the rest of val2014 is "restval"

    @model_validator(mode="after")
    def _fits_in_val2014(self) -> CocoWorld:
        for name in ("val2017", "karpathy_val", "karpathy_test"):
            if getattr(self, name) > self.val2014:
                raise ValueError(f"{name} ({getattr(self, name)}) exceeds val2014 ({self.val2014})")
        if self.karpathy_val + self.karpathy_test > self.val2014:
            raise ValueError(
                f"karpathy_val + karpathy_test ({self.karpathy_val + self.karpathy_test}) "
                f"exceeds val2014 ({self.val2014})"
            )
        return self


class FlickrWorld(Section):
    train: Count = 1500
    val: Count = 250
    test: Count = 500


class ConceptualCaptionsWorld(Section):
    samples: Count = 2000  # rows img2dataset tried, failures included
    shard_size: Annotated[int, Field(gt=0, le=100_000, strict=True)] = 500
    failed: Count = 20  # rows with status failed_to_download: in the parquet, not in the tar
    corrupt: Count = 2  # successes whose JPEG bytes are truncated, as happens on the web

    @model_validator(mode="after")
    def _fits(self) -> ConceptualCaptionsWorld:
        if self.failed + self.corrupt > self.samples:
            raise ValueError(f"failed + corrupt ({self.failed + self.corrupt}) exceeds samples")
        return self


class ZeroShotWorld(Section):
    imagenet_per_class: Count = 5
    cifar10_train_per_class: Count = 10
    cifar10_test_per_class: Count = 50
    cifar100_train_per_class: Count = 2
    cifar100_test_per_class: Count = 10


class ProbeWorld(Section):
    """The compositional probe (SugarCrepe's format) on fresh images used for nothing else."""

    images: Count = 320
    per_category: Count = 200  # items kept per category; generation fails if images give fewer


class World(Section):
    seed: Count = 0
    # min and max side, pixels (YAML gives a list: the field accepts it as a pair)
    image_size: Annotated[tuple[PositiveInt, PositiveInt], Field(strict=False)] = (128, 176)
    max_objects: Annotated[int, Field(ge=1, le=4, strict=True)] = 4
    coco: CocoWorld = CocoWorld()
    flickr30k: FlickrWorld = FlickrWorld()
    cc: ConceptualCaptionsWorld = ConceptualCaptionsWorld()
    zeroshot: ZeroShotWorld = ZeroShotWorld()
    probe: ProbeWorld = ProbeWorld()
    # Karpathy test images copied byte for byte into Flickr30k train and into CC, as web crawls
    # do: the leakage guard's content hash must catch them.
    planted_duplicates: Count = 5
    out: str = "demo/raw"

    @field_validator("image_size")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1] or v[0] < 32:
            raise ValueError(f"must be [min, max] with 32 <= min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _duplicates_fit(self) -> World:
        room = min(self.coco.karpathy_test, self.flickr30k.train, self.cc.samples)
        if self.planted_duplicates > room:
            raise ValueError(
                f"planted_duplicates ({self.planted_duplicates}) exceeds the smallest of "
                f"coco.karpathy_test, flickr30k.train and cc.samples ({room})"
            )
        return self


# --- model specs shared by several stages ----------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def _path(v: str) -> str:
    if not v.strip() or "\0" in v:
        raise ValueError("must be a non-empty path")
    return v


# A path, relative to the params file's folder (the repository root) unless absolute.
PathStr = Annotated[str, AfterValidator(_path)]


@functools.cache
def _open_clip_models() -> frozenset[str]:
    from pipeline.models.clip import available_models

    return frozenset(available_models())


class Clip(Section):
    """A CLIP model: an open_clip architecture and where its weights come from."""

    model: str = "DCLIP-Demo-RN64"
    # An open_clip pretrained tag (e.g. "openai", fetched by open_clip when online), a path to a
    # checkpoint file, or "none": the real architecture, randomly initialised.
    pretrained: str = "demo/weights/clip-DCLIP-Demo-RN64.pt"
    # Where the weights stage writes those weights as a file; what every later stage loads.
    checkpoint: PathStr = "data/weights/clip.pt"

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in _open_clip_models():
            raise ValueError(f"unknown open_clip model {v!r}")
        return v

    @field_validator("pretrained")
    @classmethod
    def _weights_exist(cls, v: str, info: ValidationInfo) -> str:
        if v == "none":
            return v
        model = info.data.get("model")
        if model is not None:
            import open_clip

            if v in open_clip.list_pretrained_tags_by_model(model):
                # open_clip only warns when the activation differs from the one the weights were
                # trained with; OpenAI's weights under "ViT-B-32" would quietly lose accuracy.
                tag_quick = open_clip.get_pretrained_cfg(model, v).get("quick_gelu", False)
                model_quick = open_clip.get_model_config(model).get("quick_gelu", False)
                if tag_quick != model_quick:
                    hint = f"{model}-quickgelu" if tag_quick else model.removesuffix("-quickgelu")
                    raise ValueError(
                        f"the {v!r} weights were trained with quick_gelu={tag_quick} but {model!r} "
                        f"uses quick_gelu={model_quick}; use clip.model: {hint}"
                    )
                return v
        if looks_like_path(v) and not (_base_dir(info) / v).is_file():
            raise ValueError(f"weights file {v!r} does not exist")
        if not looks_like_path(v):
            raise ValueError(f"{v!r} is neither 'none', an open_clip tag for {model}, nor a file")
        return v


def looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


@functools.cache
def _ultralytics_model_yamls() -> frozenset[str]:
    from pipeline.runtime import import_ultralytics

    ultralytics = import_ultralytics()
    root = Path(str(ultralytics.__file__)).parent / "cfg" / "models"
    return frozenset(p.name for p in root.rglob("*.yaml"))


@functools.cache
def _ultralytics_assets() -> frozenset[str]:
    from pipeline.runtime import import_ultralytics

    import_ultralytics()
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    return frozenset(GITHUB_ASSETS_NAMES)


class Detector(Section):
    """An ultralytics YOLO detector: its architecture and where its weights come from."""

    model: str = "yolov8n.yaml"  # architecture, used when weights is "none"
    # A checkpoint path, an ultralytics release name (e.g. "yolov8x.pt", fetched when online),
    # or "none": the architecture in `model`, randomly initialised.
    weights: str = "demo/weights/yolo-demo-v8n.pt"
    # Where the weights stage writes those weights as a file; what the detect stage loads.
    checkpoint: PathStr = "data/weights/detector.pt"

    @field_validator("model")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        # ultralytics reads the scale letter off the name: yolov8x.yaml is yolov8.yaml at scale x.
        generic = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", v)
        if not v.endswith(".yaml") or not {v, generic} & _ultralytics_model_yamls():
            raise ValueError(f"unknown ultralytics model config {v!r}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str, info: ValidationInfo) -> str:
        if v == "none" or v in _ultralytics_assets():
            return v
        if not (_base_dir(info) / v).is_file():
            raise ValueError(f"weights file {v!r} does not exist and is not an ultralytics release")
        return v


# --- curate: training pairs, the leakage guard, evaluation sets -------------------------------


JpegQuality = Annotated[int, Field(ge=1, le=100, strict=True)]


class Mix(Section):
    """Training pairs per source. The paper's ViT-B mix is coco 42000, flickr30k 10000, cc 15000
    (ViT-L: 85000, 20000, 15000); the demo's is sized for a quick CPU run. 0 or null: no pairs
    from that source, whose training input (coco's annotations, cc's shards) is then not read."""

    coco: Count = 12500
    flickr30k: Count = 5000
    cc: Count = 1000

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_none(cls, v: Any) -> Any:
        return 0 if v is None else v


class CaptionRules(Section):
    # The longest caption kept, in tokens of clip.model's own tokenizer, start and end tokens
    # included; null: the model's context length. Longer captions are refused, not truncated.
    max_tokens: Annotated[int, Field(ge=3, strict=True)] | None = None


class Curate(Section):
    seed: Count = 0
    mix: Mix = Mix()
    # A source the mix asks pairs of that yields none (an empty or unreadable download folder) is an
    # error; true: a printed warning, and the run goes on without that source.
    allow_empty_source: bool = False
    # 1: one caption per image, drawn from seed and id (the paper); "all": every usable caption
    # is a pair (mix counts pairs; the last image may give fewer than all).
    captions_per_image: Literal[1, "all"] = "all"
    caption: CaptionRules = CaptionRules()
    image_size: Annotated[int, Field(gt=0, le=4096, strict=True)] = (
        160  # short side of stored images; at least the model's input size
    )
    jpeg_quality: JpegQuality = 90
    shard_size: Annotated[int, Field(gt=0, le=100_000, strict=True)] = 2000  # samples per shard
    out: PathStr = "data/curated"

    @field_validator("captions_per_image", mode="before")
    @classmethod
    def _one_or_all(cls, v: Any) -> Any:
        # Literal[1] alone would take True and 1.0 for 1.
        if not ((type(v) is int and v == 1) or v == "all"):
            raise ValueError("must be 1 or 'all'")
        return v


class CocoSource(Section):
    images: PathStr = "demo/raw/coco"  # holds train2017/ and val2017/ (or the 2014 folders)
    # Training candidates; read only when curate.mix.coco asks for pairs.
    train_annotations: PathStr | None = "demo/raw/coco/annotations/captions_train2017.json"


class Flickr30kSource(Section):
    images: PathStr = "demo/raw/flickr30k/flickr30k-images"


def _file_name(v: str | None) -> str | None:
    if v is not None and (not v.strip() or "/" in v or "\\" in v or v in (".", "..")):
        raise ValueError("must be a file name inside sources.karpathy.folder, without a folder")
    return v


FileName = Annotated[str, AfterValidator(_file_name)]


class KarpathySource(Section):
    """Karpathy's split files, all in one folder: DVC depends on the folder as a whole, so the
    optional CLIP_benchmark files need no dvc.yaml entry of their own."""

    folder: PathStr = "demo/raw/karpathy"
    # Each read when its source is on (not null): its val and test images are held out of training.
    coco: FileName | None = "dataset_coco.json"
    flickr30k: FileName | None = "dataset_flickr30k.json"
    # Optional: take a test set (images and captions) from CLIP_benchmark's file instead of the
    # Karpathy JSON; its images are held out too.
    coco_test: Annotated[str | None, AfterValidator(_file_name)] = None  # coco_test_karpathy.json
    flickr30k_test: Annotated[str | None, AfterValidator(_file_name)] = None  # flickr30k_test_karpathy.txt


class CcSource(Section):
    shards: PathStr = "demo/raw/cc"  # img2dataset output: *.tar with their *.parquet


class ImagenetSource(Section):
    # Class folders <wnid>/; names: open_clip's for ImageNet-1k, else LOC_synset_mapping.txt
    # beside this folder.
    val: PathStr = "demo/raw/imagenet/val"


class CifarSource(Section):
    folder: PathStr


class SugarcrepeSource(Section):
    annotations: PathStr = "demo/raw/sugarcrepe"  # the seven <category>.json files
    images: PathStr = "demo/raw/sugarcrepe/images"  # COCO val2017 on a real run


class Sources(Section):
    """The raw datasets (read by curate). The defaults are the demo world's.

    A source set to null is switched off: curate neither needs nor reads it, and builds nothing
    from it (no training pairs, no evaluation set), so nothing from it is evaluated or reported.
    Every source lies inside `root`, the one folder the curate stage depends on in dvc.yaml (a
    stage's dependencies cannot come and go with the params; a folder can hold what is there)."""

    root: PathStr = "demo/raw"
    coco: CocoSource | None = CocoSource()
    flickr30k: Flickr30kSource | None = Flickr30kSource()
    karpathy: KarpathySource | None = KarpathySource()
    cc: CcSource | None = CcSource()
    imagenet: ImagenetSource | None = ImagenetSource()
    cifar10: CifarSource | None = CifarSource(folder="demo/raw/cifar-10-batches-py")
    cifar100: CifarSource | None = CifarSource(folder="demo/raw/cifar-100-python")
    sugarcrepe: SugarcrepeSource | None = SugarcrepeSource()


# --- detect: YOLO regions of the training images -----------------------------------------------

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(v: str) -> str:
    if not _DEVICE.fullmatch(v):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return v


Device = Annotated[str, AfterValidator(_check_device)]  # auto, cpu, cuda or cuda:N


class Detect(Section):
    """Regions of every training image. The defaults are ultralytics' predict() defaults at the
    paper detector's (YOLOv8x) input size."""

    imgsz: PositiveInt = 160  # side of the square letterbox; a multiple of the model's stride (32)
    conf: Fraction = 0.25  # confidence threshold
    iou: Fraction = 0.7  # NMS IoU threshold
    max_regions: PositiveInt = 8  # per image, the most confident after the area filter
    # Class ids or names kept (e.g. [person, dog] for a COCO detector); null: every class.
    classes: list[int | str] | None = None
    min_area_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.002  # of the image's area
    out: PathStr = "data/regions.parquet"

    @field_validator("imgsz")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v % 32:
            raise ValueError("must be a multiple of 32, the YOLO stride")
        return v

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of class ids or names, or null for every class")
        for c in v:
            if not ((type(c) is int and c >= 0) or (isinstance(c, str) and c.strip())):
                raise ValueError(f"entry {c!r} is neither a class id (an integer >= 0) nor a class name")
        if len(set(v)) < len(v):
            raise ValueError("lists a class twice")
        return v


# --- embed: the CLIP embedding cache -----------------------------------------------------------


class Embed(Section):
    """CLIP embeddings of every training pair (clip above): whole image, regions (the whole image
    is region 0, then the detect boxes), caption, caption tokens, region weights."""

    # Context added around each box before cropping, as a fraction of the box's width (height)
    # on each side; the crop is clipped to the image.
    context_margin: Fraction = 0.0
    # Region weight factor: product (conf × area × cos, the paper), conf, area, sim or uniform;
    # normalised per pair, uniform when all factors are 0.
    weights: Literal["product", "conf", "area", "sim", "uniform"] = "product"
    # Regions per image, the whole image included (the most confident boxes); null: every box.
    max_regions: PositiveInt | None = None
    out: PathStr = "data/embeddings"


# --- evaluate: retrieval and zero-shot classification of any CLIP checkpoint ------------------

EvalSet = Literal[
    "coco_val", "flickr30k_val", "coco", "flickr30k", "imagenet", "cifar10", "cifar100", "sugarcrepe"
]


class Evaluate(Section):
    """Karpathy test retrieval and zero-shot classification of a clip.model checkpoint, on the
    evaluation sets that curate wrote."""

    # Karpathy val sets (coco_val, flickr30k_val: where choices are made), Karpathy test sets
    # (coco, flickr30k: the readout), zero-shot sets (imagenet, cifar10, cifar100) and the
    # compositional probe (sugarcrepe).
    datasets: list[EvalSet] = [
        "coco_val",
        "flickr30k_val",
        "coco",
        "flickr30k",
        "imagenet",
        "cifar10",
        "cifar100",
        "sugarcrepe",
    ]
    # single: the paper's "This is a photo of a {label}"; openai: OpenAI's 80 ImageNet templates
    # as open_clip ships them, averaged per class (normalised, mean, renormalised).
    prompts: Literal["single", "openai"] = "single"

    @field_validator("datasets")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one data set")
        if len(set(v)) != len(v):
            raise ValueError("a data set is named twice")
        return v


# --- train_teacher and distill ------------------------------------------------------------------

PositiveFloat = Annotated[float, Field(gt=0.0)]


class Teacher(Section):
    """The cross-modal meta-teacher (pipeline/models/teacher.py) and its training on the embed
    cache. Its width is CLIP's joint space, read from the cache."""

    heads: PositiveInt = 8  # attention heads; must divide the width (8 for ViT-B's 512, 12 for ViT-L's 768)
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    attention: Literal["bidirectional", "text_to_regions", "regions_to_text", "none"] = "bidirectional"
    regions: Literal["yolo", "whole_image"] = "yolo"  # whole_image: the no-YOLO ablation
    region_weights: bool = True  # apply embed's region weights (as attention log-priors)
    pool_temperature: PositiveFloat = 0.1  # T of softmax(cos(x_i, mean x) / T) pooling
    aggregation_clusters: Literal[1, 3] = 1  # 3: the paper's ViT-L multi-cluster aggregation
    # What the student is pulled toward (pipeline/teach.py): paper (the teacher conditioned on the
    # pair's own caption), other_captions (conditioned on the image's other captions, averaged) or
    # regions (a teacher that reads no caption)
    target: Literal["paper", "other_captions", "regions"] = "paper"
    temperature: PositiveFloat = 0.07  # InfoNCE temperature (its initial value when learnable)
    learnable_temperature: bool = True
    epochs: PositiveInt = 5
    # Whose weights make the targets (the paper's "sweet spot": 2-3), or best: the epoch whose
    # targets retrieve the held-out images' unseen captions best
    use_epoch: PositiveInt | Literal["best"] = "best"
    batch_size: Annotated[int, Field(ge=2, strict=True)] = 128
    lr: PositiveFloat = 5e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    warmup_steps: Count = 10
    grad_clip: PositiveFloat | None = 1.0
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05  # held-out slice of the training pairs
    seed: Count = 0
    out: PathStr = "models/teacher.pt"
    targets: PathStr = "data/teacher_targets.parquet"

    @field_validator("use_epoch")
    @classmethod
    def _epoch_exists(cls, v: int | str, info: ValidationInfo) -> int | str:
        epochs = info.data.get("epochs")
        if isinstance(v, int) and epochs is not None and v > epochs:
            raise ValueError(f"exceeds teacher.epochs ({epochs})")
        return v

    @model_validator(mode="after")
    def _target_reads_what_it_needs(self) -> Teacher:
        if self.target == "regions" and self.attention in ("text_to_regions", "regions_to_text"):
            raise ValueError(
                f"attention {self.attention!r} needs caption tokens, which a regions target does not "
                "read: bidirectional (regions attend to each other) or none"
            )
        return self


class Distill(Section):
    """The student: clip.model from clip.pretrained, image tower fine-tuned, text tower frozen."""

    trainable_blocks: Count | None = None  # the last N image-tower blocks (and its head); null: all
    # BatchNorm running statistics stay the base model's (its layers in eval mode while training):
    # statistics of small fine-tuning batches would drift from what the base was trained with
    freeze_batchnorm: bool = True
    lambda_cos: Annotated[float, Field(ge=0.0)] = 1.0  # pull toward the teacher; 0: the no-teacher ablation
    lambda_anchor: Annotated[float, Field(ge=0.0)] = 0.0  # stay near base CLIP (the paper's ViT-L)
    epochs: PositiveInt = 5  # the paper: 2
    batch_size: Annotated[int, Field(ge=2, strict=True)] = 256  # the paper: 32
    accumulate: PositiveInt = 1  # batches per optimiser step
    lr: PositiveFloat = 2e-4  # the paper: 1e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.1
    warmup_steps: Count = 10
    grad_clip: PositiveFloat | None = 1.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 (or fp16) on CUDA, none on CPU
    seed: Count = 0
    out: PathStr = "models/student.pt"


class Export(Section):
    """The student as a folder open_clip loads by itself (pipeline/export.py)."""

    name: Annotated[str, Field(min_length=1)] = "dclip-student-demo"  # the model card's title
    out: PathStr = "models/student-open_clip"


# --- runtime: where and how fast the work runs, never what it computes --------------------------


class InferenceBatches(Section):
    """Inference batch sizes (forward passes without gradients: the rows come out the same)."""

    detect: PositiveInt = 32  # images per YOLO forward pass
    embed: PositiveInt = 64  # crops (and captions) per CLIP forward pass
    evaluate: PositiveInt = 256  # images (and captions) per forward pass


class RayRuntime(Section):
    """The Ray backend's cluster and workers (runtime.backend: ray). Every worker must see the
    project folder at the same path (one machine, or a shared filesystem): workers read the shards
    and write their parts into runtime.scratch themselves (docs/scale-out.md)."""

    address: str | None = None  # None: $RAY_ADDRESS when set, else a Ray started on this machine
    # model workers (actors); None: one per GPU share on a cluster with GPUs, else as many as its CPUs hold
    workers: PositiveInt | None = None
    gpus_per_worker: Annotated[float, Field(ge=0.0)] | None = None  # None: 1 when the cluster has GPUs
    # CPUs a worker reserves, and its torch threads; None: the threads torch uses here, so that CPU
    # workers compute the same bits as a local run (the thread count changes YOLO's float rounding)
    cpus_per_worker: PositiveInt | None = None


class Runtime(Section):
    """Where and how fast the work runs. No stage lists this section in dvc.yaml: the outputs do
    not depend on it (on another device, up to float rounding; docs/remote.md), so a change here
    re-runs nothing, and a colleague on another machine pulls instead of recomputing. Training
    batch sizes are not here: they change what is learnt (teacher.batch_size, distill.batch_size)."""

    device: Device = "auto"  # auto: CUDA (with AMP where a stage uses it), else cpu; or cpu, cuda, cuda:N
    # decoding (world: painting) processes or threads per stage (per Ray worker, per training
    # process); 1: in its own process; auto: one per core of its share of the machine
    workers: PositiveInt | Literal["auto"] = 2
    batch_size: InferenceBatches = InferenceBatches()
    scratch: PathStr = "data/scratch"  # resumable parts of killed runs, one folder per stage under it
    # distill: recompute the image tower's transformer activations in the backward pass instead of
    # keeping them: the same weights in much less memory (ViT-L/14 at batch 32 on a 24 GB machine),
    # for about one more forward pass
    grad_checkpointing: bool = False
    # curate, detect, embed and evaluate: local (this process and its pools) or ray (runtime.ray)
    backend: Literal["local", "ray"] = "local"
    ray: RayRuntime = RayRuntime()
    # train_teacher and distill: data-parallel processes on this machine (torch.distributed, launched
    # through torchrun by the stage itself); a multi-node run is launched by torchrun or srun instead
    processes: PositiveInt = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _count_or_auto(cls, v: Any) -> Any:
        # The union alone would report two errors and take True for 1.
        if not ((type(v) is int and v > 0) or v == "auto"):
            raise ValueError("must be a whole number above 0 or 'auto'")
        return v


SCRATCH_FOLDERS = ("detect", "embed", "teacher", "distill")  # the stages that resume, under runtime.scratch


class Params(Section):
    world: World = World()
    clip: Clip = Clip()
    detector: Detector = Detector()
    sources: Sources = Sources()
    curate: Curate = Curate()
    detect: Detect = Detect()
    embed: Embed = Embed()
    evaluate: Evaluate = Evaluate()
    teacher: Teacher = Teacher()
    distill: Distill = Distill()
    export: Export = Export()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _other_captions_need_them(self) -> Params:
        # Only when the file sets both sections: a stage validating a few sections leaves the rest
        # at their defaults, which must not be mistaken for the file's.
        both = {"teacher", "curate"} <= self.model_fields_set
        if both and self.teacher.target == "other_captions" and self.curate.captions_per_image != "all":
            raise ValueError(
                "teacher.target other_captions needs every caption of an image: set "
                "curate.captions_per_image: all"
            )
        from pipeline.config_rules import problems

        found = problems(self)
        if found:
            raise ValueError("\n  ".join(found))
        return self


# --- loading ---------------------------------------------------------------------------------


def _format_errors(source: str, err: ValidationError, raw: Any) -> str:
    lines = [source]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if not key:  # rules across sections: one line each, every message names its keys
            lines += ["  " + line for line in e["msg"].removeprefix("Value error, ").split("\n  ")]
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e['input']!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {msg} (value {_lookup(raw, e['loc'])!r})")
    lines[0] = f"{source}: {len(lines) - 1} invalid value(s) or combination(s)"
    return "\n".join(lines)


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def parse_params(raw: Any, source: str = "params", base_dir: Path | str = ".") -> Params:
    """Validate an already-parsed params mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context={"base_dir": Path(base_dir)})
    except ValidationError as err:
        raise ParamsError(_format_errors(source, err, raw)) from None


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats. PyYAML follows YAML 1.1, where a float needs
    a dot: `1e-5` and `1e-05` (what `dvc exp run -S distill.lr=1e-5` writes: DVC's own YAML is
    1.2) were read as strings and refused as "not a valid number"."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str | bytes) -> Any:
    """A params file's YAML as DVC reads it (YAML 1.2 numbers), with PyYAML's safe loader."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_params(
    path: Path | str = "params.yaml", only: tuple[str, ...] | None = None, base_dir: Path | None = None
) -> Params:
    """Read and validate a params file; raises ParamsError naming every bad key.

    `only` validates just those sections (the rest take their defaults): for a command that
    makes what another section points at, such as the demo weights. Relative paths are relative
    to `base_dir`, by default the file's folder (for params.yaml, the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if only is not None and isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k in only}
    return parse_params(raw, source=str(path), base_dir=base_dir if base_dir is not None else path.parent)


# --- params → a step's settings ---------------------------------------------------------------

SettingsT = TypeVar("SettingsT")


def settings(cls: type[SettingsT], section: BaseModel, **given: Any) -> SettingsT:
    """A step's frozen settings (the dataclass `cls`) from its params section: each field from
    `given`, else from the section's key of the same name. A field found in neither, or a `given`
    name that is not a field, is an error: a renamed key fails here instead of falling back to a
    default."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    values = {}
    for name in names:
        try:  # read key by key (no field listing), so that a reader of the section sees each read
            values[name] = given[name] if name in given else getattr(section, name)
        except AttributeError:
            where = f"{type(section).__name__}.{name}"
            raise TypeError(f"{cls.__name__}: no params key {where} for its field") from None
    return cls(**values)
