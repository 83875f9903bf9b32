"""CLIP models through open_clip: the project's own configs registered, weights from a tag, a
local file or nowhere; and the one inference encoder (image, text, token embeddings, zero-shot
classifiers) that embed and evaluate share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as tv_functional

from pipeline import runtime
from pipeline.errors import InputError
from pipeline.files import atomic_torch_save, file_digest

CONFIG_DIR = Path(__file__).parent / "configs"
# The project's small configs (the demo CLIP) join open_clip's own, under their file names.
open_clip.add_model_config(CONFIG_DIR)


class ClipModel(Protocol):
    """What the project calls on an open_clip CLIP model (CLIP, CustomTextCLIP). The model is held
    as an nn.Module, whose attributes torch types as `Tensor | Module`; `cast(ClipModel, net)` gives
    these calls their types."""

    logit_scale: torch.Tensor

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


def available_models() -> list[str]:
    """Architecture names that open_clip can build: its own configs and the project's."""
    return open_clip.list_models()


def architecture(model: str) -> dict:
    """An architecture's open_clip config (widths, sizes, context length), read without building
    the model or loading weights; empty for a name open_clip does not know."""
    return (open_clip.get_model_config(model) or {}) if model in available_models() else {}


def create(model: str, pretrained: str = "none", device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for an architecture and its weights.

    `pretrained`: an open_clip tag (fetched by open_clip when online), a checkpoint path, or
    "none" for the real architecture, randomly initialised. The preprocess is CLIP's own eval
    transform, normalisation included.
    """
    weights = None if pretrained == "none" else pretrained
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device)
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def save_checkpoint(net: torch.nn.Module, path: Path, half: bool = True) -> None:
    """A state dict that `open_clip.create_model_and_transforms(name, pretrained=path)` loads;
    float16 storage halves the file and loads into a float32 model unchanged in use."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    atomic_torch_save({"state_dict": state}, path)


def encode_tokens(
    net: torch.nn.Module, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption token embeddings in the joint space, as open_clip's `CLIP.encode_text` computes
    them but kept for every token: the text transformer's final hidden states through `ln_final`
    and `text_projection`. Returns (tokens [B, L, D], pooled [B, D], lengths [B]): caption i's
    real tokens (start, words, end of text) are tokens[i, :lengths[i]], and pooled[i], the token
    that encode_text pools (end of text), is tokens[i, lengths[i] - 1].

    L is the longest caption's length, not the context length: under the causal mask a token
    never sees the padding after it, so the padding is not computed at all."""
    if not isinstance(net, open_clip.CLIP):
        raise TypeError(f"token embeddings need open_clip's CLIP text tower, not {type(net).__name__}")
    if net.text_pool_type == "argmax":  # the end-of-text token has the highest id
        end = text.argmax(dim=-1)
    elif net.text_pool_type == "eos":
        end = (text == net.text_eos_id).int().argmax(dim=-1)
    else:
        raise ValueError(f"text pool type {net.text_pool_type!r}: no end-of-text token to pool")
    lengths = end + 1
    n = int(lengths.max()) if net.attn_mask is not None else text.shape[1]
    cast_dtype = net.transformer.get_cast_dtype()
    x = net.token_embedding(text[:, :n]).to(cast_dtype)
    x = x + net.positional_embedding[:n].to(cast_dtype)
    mask = net.attn_mask[:n, :n] if net.attn_mask is not None else None
    x = net.ln_final(net.transformer(x, attn_mask=mask))
    if isinstance(net.text_projection, torch.nn.Linear):
        x = net.text_projection(x)
    elif net.text_projection is not None:
        x = x @ net.text_projection
    pooled = x[torch.arange(len(x), device=x.device), end]
    return x, pooled, lengths


# --- inference: the one encoder that embed and evaluate use -----------------------------------


@dataclass
class Encoder:
    """A CLIP model's two towers on one device, for inference: float32 on the CPU, float16
    autocast on CUDA (runtime.inference_dtype). Embeddings come back float32 on the CPU, raw
    projections into the joint space or, with normalize=True, L2-normalised."""

    net: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    dim: int = 0  # width of the joint space (0: not known)
    digest: str = ""  # what the weights are: for cache keys

    def __post_init__(self) -> None:
        self._split = split_preprocess(self.preprocess)
        self.dtype = runtime.inference_dtype(self.device)

    @property
    def amp(self) -> bool:
        return self.dtype is not None

    def pixels(self, crops: list[Image.Image]) -> torch.Tensor:
        """Worker side: crops through the preprocess as far as it goes crop by crop: uint8
        (R, S, S, 3) after its PIL steps when it splits (see split_preprocess), else the whole
        transform, float (R, 3, S, S)."""
        if self._split is None:
            return torch.stack([self.preprocess(c) for c in crops])
        arrays = [np.asarray(self._split[0](c)) for c in crops]
        if any(a.dtype != np.uint8 or a.ndim != 3 for a in arrays):
            raise InputError(f"the preprocess's PIL steps gave {arrays[0].dtype} {arrays[0].shape}, not RGB")
        return torch.from_numpy(np.stack(arrays))

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of `pixels` (from `pixels`, or stacked preprocess outputs) on the device, as the
        whole transform makes it: (n, 3, S, S)."""
        x = pixels.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # ToTensor's scaling, then Normalize, for the whole batch
            assert self._split is not None
            norm = self._split[1]
            x = x.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div_(255)
            x = tv_functional.normalize(x, norm.mean, norm.std, inplace=True)
        return x

    def _out(self, emb: torch.Tensor, normalize: bool) -> torch.Tensor:
        emb = emb.float()
        return (F.normalize(emb, dim=-1) if normalize else emb).cpu()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(n, D) image embeddings of a batch."""
        with runtime.autocast(self.device, self.dtype):
            emb = cast(ClipModel, self.net).encode_image(self.model_input(pixels))
        return self._out(emb, normalize)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """(n, D) pooled text embeddings of a batch of captions."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with runtime.autocast(self.device, self.dtype):
            emb = cast(ClipModel, self.net).encode_text(tokens)
        return self._out(emb, normalize)

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per caption its token embeddings (T_i, D), and the pooled embeddings (n, D), float32."""
        text = self.tokenizer(list(texts)).to(self.device)
        with runtime.autocast(self.device, self.dtype):
            tokens, pooled, lengths = encode_tokens(self.net, text)
        tokens = tokens.float().cpu()
        return [t[:n] for t, n in zip(tokens, lengths.tolist())], pooled.float().cpu()

    @torch.inference_mode()
    def classifier(self, classnames: Sequence[str], templates: Sequence, batch_size: int) -> torch.Tensor:
        """One L2-normalised embedding per class: the mean of its normalised prompt embeddings,
        renormalised (open_clip's own classifier builder)."""
        with runtime.autocast(self.device, self.dtype):
            weights = open_clip.build_zero_shot_classifier(
                self.net,
                self.tokenizer,
                list(classnames),
                list(templates),
                num_classes_per_batch=max(1, batch_size // len(templates)),
                device=self.device,
            )
        return F.normalize(weights.T.float(), dim=-1).cpu()


def split_preprocess(preprocess: Callable) -> tuple[Callable, Any] | None:
    """CLIP's eval transform, when it is the usual Compose([PIL steps..., ToTensor, Normalize]),
    as (its PIL steps, its Normalize): ToTensor's scaling and Normalize are elementwise, so
    applying them to a stacked uint8 batch gives bit for bit what the transform gives crop by
    crop, at a fraction of the cost, and the crops wait for the model in a quarter of the
    memory. None for any other transform: it then runs whole, crop by crop."""
    from torchvision import transforms as tv

    steps = list(getattr(preprocess, "transforms", []))
    at = [i for i, t in enumerate(steps) if isinstance(t, tv.ToTensor)]
    if len(at) != 1 or [type(t) for t in steps[at[0] + 1 :]] != [tv.Normalize]:
        return None
    return tv.Compose(steps[: at[0]]), steps[-1]


def load_encoder(model: str, pretrained: str, device: str = "auto", base_dir: Path | str = ".") -> Encoder:
    """The encoder of a params CLIP: `pretrained` an open_clip tag, a checkpoint path (relative
    to base_dir) or "none": the architecture randomly initialised from a fixed seed, the same
    weights every run. The model must be open_clip's CLIP (its token embeddings are read)."""
    dev = runtime.pick_device(device)
    path = Path(base_dir) / pretrained
    is_file = pretrained != "none" and path.is_file()
    weights = str(path) if is_file else pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, preprocess, tokenizer = create(model, weights, dev)
    except Exception as err:  # open_clip raises RuntimeError, FileNotFoundError, ...
        raise InputError(f"cannot load CLIP {model!r} with weights {pretrained!r}: {err}") from None
    if not isinstance(net, open_clip.CLIP):
        raise InputError(f"{model!r} is a {type(net).__name__}: token embeddings need open_clip's CLIP")
    if is_file:
        digest = file_digest(path)
    else:  # a tag names fixed weights; "none" is seeded above
        digest = f"{model}:{pretrained}" + ("@seed0" if pretrained == "none" else "")
    dim = int(open_clip.get_model_config(model)["embed_dim"])
    return Encoder(net, preprocess, tokenizer, dev, dim, digest)
