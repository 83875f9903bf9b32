"""Caption clean-up and checks for training pairs.

`clean_caption` makes the text a model sees: Unicode NFC, control and zero-width characters
removed, every run of whitespace (tabs, newlines, non-breaking spaces) one space, no leading or
trailing space. Letters are left alone: non-ASCII captions ("Un perro en la playa", "東京の夜景")
are kept as they are.

`check_captions` decides, per caption, keep or refuse (with a reason a rejects table can count):
    caption_missing   the sample has no caption at all (img2dataset's .txt absent)
    caption_empty     nothing left after clean-up ("", "   ", "\\t\\n")
    caption_too_long  more CLIP tokens than `max_tokens`, start and end tokens included

Long captions are refused, not truncated: CLIP's tokenizer would silently cut them at its context
length, so the stored caption would not be the text the text tower encodes, and cutting text
mid-sentence ("a red circle to the left of") can change what it says about the picture. An image
whose captions are all refused is refused as a whole (no_valid_caption) by the caller.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CAPTION_REASONS = frozenset({"caption_missing", "caption_empty", "caption_too_long"})

# Characters that carry no text: C0/C1 controls (category Cc) other than whitespace, which is
# collapsed instead, and invisible format characters that tokenizers turn into stray tokens.
_INVISIBLE = {"\u200b", "\u200c", "\u2060", "\ufeff", "\u00ad"}
_WHITESPACE = re.compile(r"\s+")

TokenCounter = Callable[[str], int]


def clean_caption(text: str) -> str:
    """The caption as stored: NFC, no control/zero-width characters, single spaces, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or (unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _INVISIBLE)
    )
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True, slots=True)
class CaptionRefusal:
    index: int  # position of the caption among the image's captions
    reason: str  # one of CAPTION_REASONS
    detail: str


@dataclass(frozen=True, slots=True)
class CaptionCheck:
    kept: tuple[tuple[int, str], ...]  # (original index, cleaned text), in original order
    refused: tuple[CaptionRefusal, ...]


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def check_captions(
    captions: Sequence[str | None], count_tokens: TokenCounter, max_tokens: int
) -> CaptionCheck:
    """Clean every caption of one image and keep those that pass; refusals carry their index."""
    kept, refused = [], []
    for i, raw in enumerate(captions):
        if raw is None:
            refused.append(CaptionRefusal(i, "caption_missing", f"caption {i}: none"))
            continue
        text = clean_caption(raw)
        if not text:
            refused.append(CaptionRefusal(i, "caption_empty", f"caption {i}: {_excerpt(raw)}"))
            continue
        n = count_tokens(text)
        if n > max_tokens:
            refused.append(
                CaptionRefusal(
                    i, "caption_too_long", f"caption {i}: {n} tokens > {max_tokens}: {_excerpt(text)}"
                )
            )
            continue
        kept.append((i, text))
    return CaptionCheck(tuple(kept), tuple(refused))


def clip_token_counter(model: str) -> tuple[TokenCounter, int]:
    """(count, context length) for an open_clip model's own tokenizer; count(text) is the number
    of tokens the text tower would see untruncated, start and end tokens included.

    Imports open_clip (and torch) on first use, not at module import."""
    import open_clip

    import pipeline.models.clip  # noqa: F401  (registers the project's model configs)

    tokenizer = open_clip.get_tokenizer(model)
    context = int(tokenizer.context_length)
    encode = getattr(tokenizer, "encode", None)  # open_clip's SimpleTokenizer (CLIP's BPE)
    if callable(encode):
        return (lambda text: len(encode(text)) + 2), context
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    if hf is not None:
        return (lambda text: len(hf(text, truncation=False)["input_ids"])), context
    raise ValueError(f"cannot count tokens with {type(tokenizer).__name__}, the tokenizer of {model!r}")
