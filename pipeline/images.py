"""Decoding real-world images: every input either becomes an RGB image or raises ImageReject.

Web and photo collections hold PNGs named .jpg, CMYK JPEGs, 16-bit greyscale PNGs, palette images
with a transparent colour, camera JPEGs stored sideways with an EXIF orientation, truncated
downloads and files that are no image at all. `decode` turns each into the RGB image a viewer
would show, or raises ImageReject with a short machine-readable reason that the caller records.

Resizing follows open_clip's own preprocessing (torchvision's `Resize(size, BICUBIC)` on a PIL
image), so an image stored at the model's input size is exactly what CLIP's transform would have
made of the original (up to JPEG re-encoding): its Resize then does nothing.

Nothing here changes global PIL state: truncated files stay errors (LOAD_TRUNCATED_IMAGES is left
False) and PIL's decompression-bomb guard keeps its default limit.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = frozenset(
    {"empty_file", "not_an_image", "truncated", "too_large", "too_small", "unsupported_mode", "decode_error"}
)

# The formats a web or photo collection holds. PIL can open many more (EPS, which runs
# Ghostscript; PSD, FLI, PCX, SGI, ...), each a parser this pipeline has no use for: any other
# format is rejected as not_an_image before its decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# JPEG subsampling written by encode_jpeg: 4:4:4 keeps full colour resolution. 4:2:0 halves it,
# which smears the colour of small objects across their edges, and colour binding of small
# objects is exactly what the compositional evaluation probes.
JPEG_SUBSAMPLING = "4:4:4"

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a shard sample's image member, in this order


@dataclass(frozen=True, slots=True)
class Reject:
    """Why one input was dropped: `reason` for the counts, `detail` for a reader."""

    reason: str
    detail: str


class ImageReject(Exception):
    """An input that is not a usable image. `reason` is one of REASONS (for a rejects table and
    its counts), `message` says what was wrong in words."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {sorted(REASONS)}")
        # Both in args, so that the exception survives pickling back from a worker process.
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def decode(data: bytes) -> Image.Image:
    """The RGB image that `data` shows, fully decoded, EXIF orientation applied.

    The format is sniffed from the bytes (a file's name is never consulted). Raises ImageReject:
    empty_file (zero bytes), not_an_image (no accepted format recognises the bytes), truncated
    (the data ends before the image does), too_large (PIL's decompression-bomb limit: more than
    2 × Image.MAX_IMAGE_PIXELS pixels), unsupported_mode (floating-point pixels), decode_error
    (anything else a decoder fails on, e.g. a corrupt PNG stream). Multi-frame files (GIF, MPO,
    animated WebP) give their first frame.
    """
    if len(data) == 0:
        raise ImageReject("empty_file", "the file is empty (0 bytes)")
    if not _recognised(data):
        raise ImageReject(
            "not_an_image", f"{len(data)} bytes that no accepted format ({', '.join(ACCEPTED_FORMATS)}) reads"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        img.load()  # decode every pixel now: a truncated file fails here, not later in a worker
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img)
    except ImageReject:
        raise
    except UnidentifiedImageError:
        raise ImageReject(
            "not_an_image", f"{len(data)} bytes that no accepted format ({', '.join(ACCEPTED_FORMATS)}) reads"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageReject("too_large", str(err)) from None
    except MemoryError:
        raise  # the machine's limit, not a property of this file
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        if "truncated" in str(err).lower():
            raise ImageReject("truncated", f"the data ends before the image does ({err})") from None
        raise ImageReject("decode_error", f"{type(err).__name__}: {err}") from None


def image_member(sample: dict[str, bytes]) -> bytes | None:
    """The bytes of a WebDataset sample's image member, None when it has none."""
    return next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)


def decode_sample(sample: dict[str, bytes]) -> Image.Image | Reject:
    """A WebDataset sample's image, decoded as `decode` does, or the Reject saying why not."""
    data = image_member(sample)
    if data is None:
        return Reject("no_image", f"no image member among {sorted(sample)}")
    try:
        return decode(data)
    except ImageReject as err:
        return Reject(err.reason, err.message)


def _recognised(data: bytes) -> bool:
    """Whether an accepted format's own signature check knows the first 16 bytes, as Image.open
    asks. Checked before Image.open because ultralytics, once imported, replaces Image.open with a
    wrapper that answers an unrecognised file by trying to pip-install a HEIF plugin."""
    Image.init()
    prefix = data[:16]
    for fmt in ACCEPTED_FORMATS:
        _factory, accept = Image.OPEN[fmt]
        if accept is None or accept(prefix):
            return True
    return False


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # PIL's own convert("L") clips 16-bit values at 255, turning a 16-bit greyscale photo
        # nearly white. Scale instead: v / 257 rounded (65535 → 255; 257 is odd, so no ties).
        # Mode "I" (32-bit) is how PIL has also opened 16-bit PNGs; it is read as 16-bit, clipped.
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise ImageReject("unsupported_mode", "floating-point pixels (mode F) have no agreed 8-bit scale")
    if img.has_transparency_data:
        # Alpha (RGBA, LA, PA), a palette entry marked transparent, or a tRNS key colour. Dropping
        # alpha would show whatever colour transparent pixels happen to store (often black, or
        # leftovers); the picture was made to be seen over a page, almost always white, which is
        # how whoever captioned it saw it. So: composite over white,
        # out = (c·a + 255·(255 − a)) / 255, rounded to nearest.
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        alpha = rgba[..., 3:4]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if img.mode == "RGB":
        return img
    try:
        # CMYK (no colour management: embedded ICC profiles are ignored), L, 1, P, YCbCr, ...
        return img.convert("RGB")
    except ValueError as err:
        raise ImageReject("unsupported_mode", f"mode {img.mode}: {err}") from None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resize_short_side: the short side becomes `size`, the long side
    floor(size × long / short) — torchvision's rule (its Resize(int) truncates), so that
    open_clip's transform leaves the result alone. 640×480 → (298, 224). An image whose short
    side is already ≤ size keeps its size."""
    _check_positive_int("size", size)
    short, long = min(width, height), max(width, height)
    if short <= size:
        return width, height
    new_long = size * long // short
    return (size, new_long) if width <= height else (new_long, size)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Shrink `img` so that its short side is `size`, keeping the aspect ratio (see resized_size
    for the rounding). Bicubic, the filter open_clip's transform uses, applied to the whole image
    in one pass (no `reducing_gap`: that would be faster on large images but no longer equal to
    CLIP's own preprocessing). Never upscales: a smaller image is returned as it is (the same
    object), since CLIP's transform upscales at load time anyway and storing the upscaled copy
    would only cost space. The result may be `img` itself; callers must not modify it."""
    new = resized_size(img.width, img.height, size)
    if new == img.size:
        return img
    return img.resize(new, Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG of an RGB image: same pixels and quality, same bytes. Fixed 4:4:4 chroma
    subsampling, no optimisation pass, not progressive, and no EXIF, ICC profile or DPI (PIL
    writes only what it is given)."""
    if img.mode != "RGB":
        raise ValueError(f"encode_jpeg expects an RGB image, got mode {img.mode}")
    _check_quality(quality)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING, optimize=False, progressive=False)
    return buf.getvalue()


def content_hash(img: Image.Image) -> str:
    """sha256 hex of b"RGB <width> <height>\\n" followed by the pixels, row by row, 3 bytes each.

    Two files match when they decode to the same pixels (the same picture saved as PNG and as a
    lossless copy, COCO 2014 and 2017 copies of one file); a resized or re-compressed copy does
    not. The size is hashed so that equal bytes in different shapes (2×6, 3×4) differ. The hash
    is of decoded pixels, so it is stable for one Pillow/libjpeg build: compare hashes computed
    in the same environment."""
    if img.mode != "RGB":
        raise ValueError(f"content_hash expects an RGB image, got mode {img.mode}")
    digest = hashlib.sha256(b"RGB %d %d\n" % (img.width, img.height))
    digest.update(img.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """One image ready for a shard. Sizes are after EXIF orientation (as the image is shown)."""

    jpeg: bytes = field(repr=False)
    width: int
    height: int
    original_width: int
    original_height: int
    content_hash: str  # of the decoded original, before resizing


def decode_and_prepare(data: bytes, size: int, quality: int, *, min_side: int = 1) -> Prepared:
    """Decode, hash, shrink and re-encode one image: the per-image worker of a process pool.

    Raises ImageReject for a bad image (see decode), and too_small when the original's short
    side is under `min_side`. Bad arguments raise ValueError before any decoding, so a wrong
    setting fails the run instead of rejecting every image.
    """
    _check_positive_int("size", size)
    _check_quality(quality)
    _check_positive_int("min_side", min_side)
    img = decode(data)
    width, height = img.size
    if min(width, height) < min_side:
        raise ImageReject("too_small", f"{width}×{height} pixels: the short side is under {min_side}")
    digest = content_hash(img)
    small = resize_short_side(img, size)
    return Prepared(
        jpeg=encode_jpeg(small, quality),
        width=small.width,
        height=small.height,
        original_width=width,
        original_height=height,
        content_hash=digest,
    )


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer between 1 and 100, got {quality!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
