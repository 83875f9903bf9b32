"""pipeline.images: every awkward input is built here with PIL, and each decodes to exact pixels or
raises ImageReject with the expected reason."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from pipeline.images import (
    ImageReject,
    Prepared,
    content_hash,
    decode,
    decode_and_prepare,
    encode_jpeg,
    resize_short_side,
    resized_size,
)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random RGB content: detail at every scale, like a photograph."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def pixels(img: Image.Image) -> list:
    return np.asarray(img).tolist()


def reject_reason(data: bytes) -> str:
    with pytest.raises(ImageReject) as info:
        decode(data)
    return info.value.reason


# --- decode: formats and modes -----------------------------------------------------------------


def test_rgb_png_decodes_to_its_exact_pixels():
    img = photo(40, 30)
    out = decode(encoded(img, "PNG"))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_png_named_jpg_is_sniffed_from_its_bytes(tmp_path):
    img = photo(20, 10)
    path = tmp_path / "000000391895.jpg"
    path.write_bytes(encoded(img, "PNG"))
    out = decode(path.read_bytes())
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    data = encoded(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.full((8, 8, 3), (255, 0, 0)))


def test_greyscale_l_becomes_grey_rgb():
    grey = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), "L")
    assert pixels(decode(encoded(grey, "PNG"))) == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_greyscale_with_alpha_is_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8), "LA")
    # (100·128 + 255·127) / 255 = 177.4 → 177
    assert pixels(decode(encoded(la, "PNG"))) == [[[255, 255, 255], [0, 0, 0], [177, 177, 177]]]


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 32896, 65535]], dtype=np.uint16)
    data = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # v / 257 rounded; PIL's own convert("L") would give 0, 128, 129, 255, 255.
    assert [p[0] for p in pixels(decode(data))[0]] == [0, 0, 1, 128, 255]


def test_32_bit_integer_greyscale_is_read_as_16_bit():
    values = np.array([[-5, 257, 65535, 1_000_000]], dtype=np.int32)
    data = encoded(Image.fromarray(values, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert [p[0] for p in pixels(decode(data))[0]] == [0, 1, 255, 255]


def test_palette_with_transparent_entry_is_composited_on_white():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255])
    pal.putpixel((1, 0), 1)
    data = encoded(pal, "PNG", transparency=1)  # palette entry 1 (blue) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert pixels(decode(data)) == [[[255, 0, 0], [255, 255, 255]]]


def test_palette_without_transparency_keeps_its_colours():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255])
    pal.putpixel((1, 0), 1)
    assert pixels(decode(encoded(pal, "GIF"))) == [[[255, 0, 0], [0, 0, 255]]]


def test_rgba_is_composited_on_white():
    rgba = np.array([[[200, 0, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    data = encoded(Image.fromarray(rgba, "RGBA"), "PNG")
    # R: (200·128 + 255·127) / 255 = 227.4 → 227; G, B: 255·127 / 255 = 127.
    assert pixels(decode(data)) == [[[227, 127, 127], [255, 255, 255], [10, 20, 30]]]


def test_rgb_with_transparent_key_colour_is_composited_on_white():
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8), "RGB")
    data = encoded(rgb, "PNG", transparency=(1, 2, 3))
    assert pixels(decode(data)) == [[[255, 255, 255], [4, 5, 6]]]


def test_multi_frame_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert pixels(decode(data)) == [[[255, 0, 0]] * 4] * 4


def test_exif_orientation_6_is_applied():
    # Stored 64×32 in quadrants; orientation 6 means "rotate 90° clockwise to display".
    red, green, blue, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :32], stored[:16, 32:], stored[16:, :32], stored[16:, 32:] = red, green, blue, white
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    out = decode(data)
    assert out.size == (32, 64)  # transposed
    shown = np.asarray(out).astype(int)
    # Clockwise: the stored bottom-left goes to the top-left, the stored top-left to the top-right.
    centres = {(8, 16): blue, (24, 16): red, (8, 48): white, (24, 48): green}  # (x, y) → colour
    for (x, y), colour in centres.items():
        assert np.abs(shown[y, x] - colour).max() <= 8, ((x, y), shown[y, x].tolist(), colour)


def test_exif_orientation_1_keeps_the_layout():
    exif = Image.Exif()
    exif[0x0112] = 1
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    assert decode(encoded(img, "JPEG", exif=exif)).size == (6, 4)


# --- decode: rejects ---------------------------------------------------------------------------


def test_zero_bytes_is_empty_file():
    assert reject_reason(b"") == "empty_file"


def test_truncated_jpeg_is_rejected_not_padded_with_grey():
    data = encoded(photo(160, 120), "JPEG", quality=90)
    assert reject_reason(data[: len(data) // 3]) == "truncated"


def test_truncated_png_is_rejected():
    data = encoded(photo(160, 120), "PNG")
    assert reject_reason(data[: len(data) // 3]) == "truncated"


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(3).bytes(1000)
    assert reject_reason(data) == "not_an_image"
    assert reject_reason(b"<html><body>404 Not Found</body></html>") == "not_an_image"


def test_a_format_outside_the_accepted_list_is_not_an_image():
    data = encoded(Image.new("RGB", (4, 4)), "TGA")
    assert Image.open(io.BytesIO(data)).format == "TGA"  # PIL itself would read it
    assert reject_reason(data) == "not_an_image"


def test_corrupt_png_stream_is_a_decode_error():
    data = bytearray(encoded(photo(160, 120), "PNG"))
    start = data.find(b"IDAT") + 10
    data[start : start + 30] = bytes(b ^ 0x55 for b in data[start : start + 30])
    with pytest.raises(ImageReject) as info:
        decode(bytes(data))
    assert info.value.reason == "decode_error"
    assert str(info.value) == "decode_error: OSError: broken data stream when reading image file"


def test_floating_point_pixels_are_an_unsupported_mode():
    data = encoded(Image.new("F", (3, 2), 0.5), "TIFF")
    assert reject_reason(data) == "unsupported_mode"


def test_decompression_bomb_is_too_large_and_the_default_guard_is_kept(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # Over 2 × the limit: PIL's error, turned into a reject.
    assert reject_reason(encoded(Image.new("RGB", (15, 15)), "PNG")) == "too_large"
    # Between 1× and 2×: PIL only warns, as by default.
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode(encoded(Image.new("RGB", (12, 12)), "PNG")).size == (12, 12)


def test_global_pil_state_is_left_alone():
    data = encoded(photo(64, 48), "JPEG")
    reject_reason(data[: len(data) // 3])
    decode(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


def test_image_reject_survives_pickling_and_knows_its_reasons():
    err = pickle.loads(pickle.dumps(ImageReject("truncated", "the data ends early")))
    assert (err.reason, err.message, str(err)) == (
        "truncated",
        "the data ends early",
        "truncated: the data ends early",
    )
    with pytest.raises(ValueError, match="unknown reject reason 'trunc'"):
        ImageReject("trunc", "x")


# --- resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (640, 480, (298, 224)),  # 224 × 640 / 480 = 298.67, floored as torchvision does
        (480, 640, (224, 298)),
        (500, 500, (224, 224)),
        (1000, 225, (995, 224)),  # 995.6 → 995
        (225, 1000, (224, 995)),
        (100, 50, (100, 50)),  # never upscaled
        (224, 300, (224, 300)),  # already there
    ],
)
def test_resized_size(width, height, expected):
    assert resized_size(width, height, 224) == expected


def test_resize_short_side_equals_open_clips_resize():
    # open_clip's transform is torchvision's Resize(size, BICUBIC) on a PIL image: same pixels,
    # so it does nothing more to an image stored at the model's size.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    for w, h in [(640, 480), (333, 500)]:
        img = photo(w, h, seed=w)
        ours = resize_short_side(img, 224)
        theirs = F.resize(img, 224, InterpolationMode.BICUBIC)
        assert ours.size == theirs.size == resized_size(w, h, 224)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
        assert F.resize(ours, 224, InterpolationMode.BICUBIC).tobytes() == ours.tobytes()


def test_resize_short_side_does_not_upscale():
    img = photo(100, 50)
    assert resize_short_side(img, 224) is img


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_resize_rejects_a_bad_size(size):
    with pytest.raises(ValueError, match="size must be a positive integer"):
        resize_short_side(photo(10, 10), size)


# --- encode_jpeg -------------------------------------------------------------------------------


def test_encode_jpeg_is_deterministic_444_baseline_without_metadata():
    exif = Image.Exif()
    exif[0x0112] = 6
    src = Image.open(io.BytesIO(encoded(photo(64, 48), "JPEG", exif=exif, icc_profile=b"\0" * 128)))
    src.load()
    assert "exif" in src.info and "icc_profile" in src.info
    img = src.convert("RGB")
    img.info.update(src.info)
    first, second = encode_jpeg(img, 90), encode_jpeg(img.copy(), 90)
    assert first == second
    assert first[:2] == b"\xff\xd8"
    assert b"Exif" not in first and b"ICC_PROFILE" not in first
    back = Image.open(io.BytesIO(first))
    assert JpegImagePlugin.get_sampling(back) == 0  # 4:4:4
    assert "progressive" not in back.info and "progression" not in back.info
    assert encode_jpeg(img, 50) != first


def test_encode_jpeg_refuses_non_rgb_and_bad_quality():
    with pytest.raises(ValueError, match="expects an RGB image, got mode L"):
        encode_jpeg(Image.new("L", (2, 2)), 90)
    with pytest.raises(ValueError, match="quality must be an integer between 1 and 100, got 101"):
        encode_jpeg(Image.new("RGB", (2, 2)), 101)


# --- content_hash ------------------------------------------------------------------------------


def test_content_hash_definition():
    img = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8), "RGB")
    expected = hashlib.sha256(b"RGB 2 1\n\x01\x02\x03\x04\x05\x06").hexdigest()
    assert content_hash(img) == expected == "d7e1bd2470526faf4ad18d0014ef76ab14992431e0b5f5295cdf869520f49dd3"


def test_content_hash_matches_across_lossless_encodings_and_not_across_resizes():
    img = photo(48, 32)
    digests = {content_hash(decode(encoded(img, fmt))) for fmt in ("PNG", "BMP", "TIFF")}
    assert digests == {content_hash(img)}
    assert content_hash(resize_short_side(img, 16)) != content_hash(img)


def test_content_hash_includes_the_size():
    data = bytes(range(36))
    a = Image.frombytes("RGB", (2, 6), data)
    b = Image.frombytes("RGB", (3, 4), data)
    assert a.tobytes() == b.tobytes()
    assert content_hash(a) != content_hash(b)


def test_content_hash_refuses_non_rgb():
    with pytest.raises(ValueError, match="expects an RGB image, got mode RGBA"):
        content_hash(Image.new("RGBA", (1, 1)))


# --- decode_and_prepare ------------------------------------------------------------------------


def test_decode_and_prepare_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(photo(640, 480), "JPEG", quality=95, exif=exif)
    out = decode_and_prepare(data, 224, 90)
    assert (out.original_width, out.original_height) == (480, 640)
    assert (out.width, out.height) == (224, 298)
    assert out.content_hash == content_hash(decode(data))
    small = Image.open(io.BytesIO(out.jpeg))
    assert (small.format, small.size, small.mode) == ("JPEG", (224, 298), "RGB")
    assert decode_and_prepare(data, 224, 90) == out  # deterministic, JPEG bytes included
    assert "jpeg" not in repr(out)


def test_decode_and_prepare_keeps_a_small_image_at_its_size():
    data = encoded(photo(120, 96), "PNG")
    out = decode_and_prepare(data, 224, 90)
    assert (out.width, out.height, out.original_width, out.original_height) == (120, 96, 120, 96)


def test_decode_and_prepare_too_small():
    with pytest.raises(ImageReject) as info:
        decode_and_prepare(encoded(photo(40, 60), "PNG"), 224, 90, min_side=50)
    assert str(info.value) == "too_small: 40×60 pixels: the short side is under 50"


def test_decode_and_prepare_bad_arguments_are_errors_not_rejects():
    with pytest.raises(ValueError, match="quality must be an integer between 1 and 100, got 0"):
        decode_and_prepare(b"", 224, 0)
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        decode_and_prepare(b"", 0, 90)


def test_decode_and_prepare_runs_in_a_process_pool():
    good = encoded(photo(300, 200), "PNG")
    truncated = encoded(photo(300, 200), "JPEG")[:500]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = pool.submit(decode_and_prepare, good, 64, 90).result()
        failed = pool.submit(decode_and_prepare, truncated, 64, 90).exception()
    assert isinstance(remote, Prepared)
    assert remote == decode_and_prepare(good, 64, 90)
    assert (remote.width, remote.height) == (96, 64)
    assert isinstance(failed, ImageReject) and failed.reason == "truncated"


def test_unrecognised_bytes_never_reach_ultralytics_patched_image_open():
    # Importing ultralytics replaces PIL's Image.open with a wrapper that, on an unrecognised
    # file, tries to install a HEIF plugin; decode must answer before that.
    import ultralytics  # noqa: F401

    assert reject_reason(np.random.default_rng(5).bytes(2000)) == "not_an_image"
