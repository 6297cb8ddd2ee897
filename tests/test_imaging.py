"""machex.imaging: decoding, the bit-depth rule, crop geometry, resampling and encoding."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from machex.imaging import (
    DEFAULT_MAX_PIXELS,
    CropBox,
    DecompressionBombError,
    Encoding,
    ImageDecodeError,
    PixelOptions,
    PngDecoder,
    crop_box_for,
    decode_image,
    encode,
    map_box,
    process_image,
    resize_and_crop,
)
from machex.imaging.decode import _sixteen_bit_peak, effective_bits
from machex.imaging.geometry import resample_filter

SIZES = (64, 256, 1024)


def _save(array: np.ndarray, path: Path) -> Path:
    """Save a 2-D uint8 (mode L) or uint16 (mode I;16) array as PNG."""
    image = Image.fromarray(array)
    assert image.mode == ("L" if array.dtype == np.uint8 else "I;16")
    image.save(path, format="PNG")
    return path


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _smooth(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random uint8 image: coarse noise upsampled bicubically."""
    coarse = rng.integers(0, 256, size=(max(2, height // 20), max(2, width // 20)), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _diagonal_ramp(side: int, peak: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    return np.rint((xx + yy) / (2 * (side - 1)) * peak).astype(np.uint16)


# --- 1. 8-bit pass-through -------------------------------------------------------------


def test_8bit_pixels_pass_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(1024, 1024), dtype=np.uint8)
    path = _save(pixels, tmp_path / "eight.png")

    result = process_image(path, PixelOptions(encoding=Encoding.png))

    out = _open(result.data)
    assert out.format == "PNG" and out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), pixels)
    assert result.bits == 8
    assert result.crop_box.as_tuple() == (0, 0, 1024, 1024)
    assert (result.orig_width, result.orig_height) == (1024, 1024)


# --- 2. deeper images span the full output range ----------------------------------------


def test_12bit_png_spans_full_8bit_range(tmp_path: Path) -> None:
    ramp = _diagonal_ramp(512, 4095)
    assert ramp.min() == 0 and ramp.max() == 4095
    path = _save(ramp, tmp_path / "twelve.png")

    result = process_image(path, PixelOptions(encoding=Encoding.png, image_size=256))

    assert result.bits == 12
    out = np.asarray(_open(result.data))
    assert out.dtype == np.uint8 and out.shape == (256, 256)
    assert out.max() >= 254
    assert out.min() <= 1
    levels = len(np.unique(out))
    naive_levels = len(np.unique(ramp >> 8))  # what a fixed 16->8 bit shift would keep
    assert naive_levels <= 16
    assert levels > 200
    assert levels > 10 * naive_levels


def test_10bit_png_reports_10_bits_and_full_range(tmp_path: Path) -> None:
    ramp = _diagonal_ramp(256, 1023)
    path = _save(ramp, tmp_path / "ten.png")

    result = process_image(path, PixelOptions(encoding=Encoding.png, image_size=256))

    assert result.bits == 10
    out = np.asarray(_open(result.data))
    assert out.max() == 255 and out.min() == 0
    assert len(np.unique(out)) > 200


def test_png16_output_is_16bit_full_range(tmp_path: Path) -> None:
    ramp = _diagonal_ramp(512, 4095)
    path = _save(ramp, tmp_path / "twelve.png")

    result = process_image(path, PixelOptions(encoding=Encoding.png16, image_size=256))

    assert result.bits == 12
    out = _open(result.data)
    assert out.format == "PNG" and out.mode in ("I;16", "I")
    values = np.asarray(out)
    assert values.shape == (256, 256)
    assert values.max() >= 65535 - 300
    assert values.min() <= 300
    # more grey levels than 8 bits could hold (a 256-wide diagonal ramp has 511 diagonals)
    assert len(np.unique(values)) > 256


# --- 3. the intensity map is exact when nothing is resampled ------------------------------


def test_12bit_intensity_mapping_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = rng.permutation(np.arange(1024 * 1024) % 4096).astype(np.uint16).reshape(1024, 1024)
    path = _save(values, tmp_path / "linear.png")

    result = process_image(path, PixelOptions(encoding=Encoding.png))

    assert result.bits == 12
    assert result.crop_box.as_tuple() == (0, 0, 1024, 1024)
    v = values.astype(np.int64)
    expected = (2 * v * 255 + 4095) // (2 * 4095)  # round(v * 255 / 4095); never a tie
    np.testing.assert_array_equal(np.asarray(_open(result.data)), expected.astype(np.uint8))


# --- 4./5. real images ------------------------------------------------------------------


def test_rgb_jpeg_becomes_single_channel(real_images: Path) -> None:
    result = process_image(real_images / "16747_3_1.jpg")

    out = _open(result.data)
    assert out.format == "JPEG"
    assert out.mode == "L"
    assert out.size == (1024, 1024)
    assert (result.orig_width, result.orig_height) == (1036, 885)
    assert result.bits == 8
    box = result.crop_box
    assert box.y0 == 0
    assert box.y1 == pytest.approx(885, abs=1e-9)
    assert box.x1 - box.x0 == pytest.approx(885, abs=1e-9)
    assert abs(box.x0 - (1036 - 885) / 2) <= 1.0
    # the content is the luma of the source window (not a channel, not mirrored or shifted)
    with Image.open(real_images / "16747_3_1.jpg") as source:
        assert source.mode == "RGB"
        luma = source.convert("L")
    expected = luma.resize((1024, 1024), resample_filter(box.scale), box=box.as_tuple())
    expected = np.asarray(expected).astype(np.int16)
    diff = np.abs(np.asarray(out).astype(np.int16) - expected)
    assert diff.mean() < 1.5  # JPEG q95 of a radiograph


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_images_become_luma(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / "colour.png"
    image.save(path)

    decoded = decode_image(path)

    assert decoded.bits == 8 and decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (48, 40)
    # ITU-R 601-2 luma, as Pillow's convert("L"), not any single channel
    np.testing.assert_array_equal(decoded.pixels, np.asarray(image.convert("L")))
    if mode == "RGB":
        r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
        luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        assert np.abs(decoded.pixels.astype(np.int64) - luma).max() <= 1
        for channel in range(3):
            assert not np.array_equal(decoded.pixels, rgb[..., channel])


@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_nih_png_upscales_to_1024(real_images: Path, name: str) -> None:
    path = real_images / name
    with Image.open(path) as source:
        assert source.mode == "L" and source.size == (512, 512)
        source_mean = float(np.asarray(source).mean())
        upscaled = np.asarray(source.resize((1024, 1024), resample_filter(2.0)))

    result = process_image(path, PixelOptions(encoding=Encoding.png))

    assert result.bits == 8
    assert result.crop_box.as_tuple() == (0, 0, 512, 512)
    out = np.asarray(_open(result.data))
    assert out.shape == (1024, 1024)
    assert abs(float(out.mean()) - source_mean) <= 2.0
    # the whole image, upscaled in place (lossless PNG): a plain resize with the same filter
    assert np.abs(out.astype(np.int16) - upscaled.astype(np.int16)).max() <= 1


# --- 6. window-only resampling ---------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"), [(700, 500), (500, 700), (800, 512), (512, 800), (1000, 350)]
)
def test_window_resample_matches_resize_then_crop(width: int, height: int) -> None:
    """``resize_and_crop`` (PIL ``box=``, only the window) vs resizing the whole image by the
    same scale ``256 / short`` and cropping the centre ``(W' - 256) // 2``.

    The reference resizes the whole image to ``round(W * s)`` pixels *at the exact scale s*
    (PIL ``box=(0, 0, W'/s, H'/s)``; for 800x512 that is the whole image): a plain
    ``resize((round(W*s), ...))`` would stretch the long axis by ``round(Ws) / Ws`` (700x500:
    358/358.4) and shift the samples by up to 0.67 source pixels at the far side of the crop,
    which is not what the crop box (one isotropic scale) describes. Tolerance 2 grey levels:
    PIL's 8-bit resampler (fixed-point weights, uint8 between its horizontal and vertical
    passes) is not bit-identical for a window and for the whole image along the vertical
    axis (measured: 512x800 up to 2 levels, mean 0.17; the same pair in float mode agrees to
    1e-5; the landscape cases here agree exactly).
    """
    rng = np.random.default_rng(6)
    pixels = _smooth(rng, width, height)
    box = crop_box_for(width, height, 256)

    ours = resize_and_crop(pixels, box)

    scale = 256 / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    assert new_w / scale <= width and new_h / scale <= height  # rounded down: box fits
    left, top = (new_w - 256) // 2, (new_h - 256) // 2
    whole = Image.fromarray(pixels).resize(
        (new_w, new_h),
        resample_filter(scale),
        box=(0, 0, new_w / scale, new_h / scale),
    )
    reference = np.asarray(whole.crop((left, top, left + 256, top + 256)))

    assert ours.dtype == np.uint8 and ours.shape == (256, 256)
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 2
    assert diff.mean() < 0.5


def test_halving_a_12bit_png_is_an_area_average(tmp_path: Path) -> None:
    """A 2x reduction averages 2x2 blocks (the box filter from 2x on), in float: no 8-bit or
    16-bit rounding between the passes, one rounding at the end."""
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    pixels[0, 0] = 4095
    path = _save(pixels, tmp_path / "deep.png")

    out = np.asarray(_open(process_image(path, PixelOptions(encoding=Encoding.png)).data))

    blocks = pixels.astype(np.float64).reshape(1024, 2, 1024, 2).mean(axis=(1, 3))
    expected = blocks * 255 / 4095
    assert np.abs(out - expected).max() <= 0.5 + 1e-3


@pytest.mark.parametrize(
    ("scale", "expected"),
    [(2.0, "BICUBIC"), (1.0, "BICUBIC"), (0.8, "BILINEAR"), (0.51, "BILINEAR"), (0.5, "BOX")],
)
def test_filter_follows_the_scale(scale: float, expected: str) -> None:
    assert resample_filter(scale) is Image.Resampling[expected]


def test_resize_and_crop_rejects_deep_input_without_ranges() -> None:
    with pytest.raises(ValueError):
        resize_and_crop(np.zeros((10, 10), np.uint16), crop_box_for(10, 10, 8), target_max=255)


# --- 7. crop geometry properties --------------------------------------------------------

dims = st.integers(16, 5000)
sizes = st.sampled_from(SIZES)


def _ideal_window(width: int, height: int, size: int) -> tuple[Fraction, ...]:
    """The crop window in exact arithmetic (what ``crop_box_for`` approximates in floats)."""
    short = min(width, height)
    resized_w = round(Fraction(width * size, short))
    resized_h = round(Fraction(height * size, short))
    left, top = (resized_w - size) // 2, (resized_h - size) // 2
    f = Fraction(short, size)
    return left * f, top * f, (left + size) * f, (top + size) * f


@settings(max_examples=100, deadline=None)
@given(width=dims, height=dims, size=sizes, fx=st.floats(0, 1), fy=st.floats(0, 1))
def test_crop_box_geometry(width: int, height: int, size: int, fx: float, fy: float) -> None:
    box = crop_box_for(width, height, size)
    eps = 1e-6
    assert box.size == size
    assert -eps <= box.x0 < box.x1 <= width + eps
    assert -eps <= box.y0 < box.y1 <= height + eps
    # square in original pixels, spanning the full short edge
    assert box.x1 - box.x0 == pytest.approx(box.y1 - box.y0, abs=eps)
    short = min(width, height)
    assert box.x1 - box.x0 == pytest.approx(short, abs=eps)
    if width <= height:
        assert box.x0 == pytest.approx(0, abs=eps) and box.x1 == pytest.approx(width, abs=eps)
    if height <= width:
        assert box.y0 == pytest.approx(0, abs=eps) and box.y1 == pytest.approx(height, abs=eps)
    assert box.scale == pytest.approx(size / short, rel=1e-12)
    # centred on the long edge to within one output pixel
    for lo, extent in ((box.x0, width), (box.y0, height)):
        assert abs(lo * box.scale - (extent * box.scale - size) / 2) <= 1.0
    # corners map to 0 and size; round trip through the output frame
    assert box.to_output(box.x0, box.y0) == pytest.approx((0, 0), abs=eps)
    assert box.to_output(box.x1, box.y1) == pytest.approx((size, size), abs=eps)
    x, y = fx * width, fy * height
    assert box.to_original(*box.to_output(x, y)) == pytest.approx((x, y), abs=eps)
    assert box.to_output(*box.to_original(fx * size, fy * size)) == pytest.approx(
        (fx * size, fy * size), abs=eps
    )


@settings(max_examples=100, deadline=None)
@given(width=dims, height=dims, size=sizes, data=st.data())
def test_map_box_inside_image(width: int, height: int, size: int, data: st.DataObject) -> None:
    box = crop_box_for(width, height, size)
    x = data.draw(st.integers(0, width - 1), label="x")
    y = data.draw(st.integers(0, height - 1), label="y")
    w = data.draw(st.integers(1, width - x), label="w")
    h = data.draw(st.integers(1, height - y), label="h")

    mapped = map_box(x, y, w, h, box)

    ix0, iy0, ix1, iy1 = _ideal_window(width, height, size)
    overlap = x < ix1 and x + w > ix0 and y < iy1 and y + h > iy0
    if mapped is None:
        event("outside the crop")
        assert not overlap
        return
    assert overlap
    # the result lies within the output frame and equals the mapped, clipped box
    assert mapped.x >= 0 and mapped.x + mapped.width <= size + 1e-9
    assert mapped.y >= 0 and mapped.y + mapped.height <= size + 1e-9
    assert mapped.width > 0 and mapped.height > 0
    ex0, ey0 = box.to_output(max(x, box.x0), max(y, box.y0))
    ex1, ey1 = box.to_output(min(x + w, box.x1), min(y + h, box.y1))
    assert (mapped.x, mapped.y) == pytest.approx((ex0, ey0), abs=1e-6)
    assert (mapped.width, mapped.height) == pytest.approx((ex1 - ex0, ey1 - ey0), abs=1e-6)
    # clipped exactly when the box leaves the crop window. An edge that coincides with the
    # window edge (to 1e-9 original pixels) is a floating-point tie, checked separately by
    # test_box_on_the_short_edge_is_not_clipped.
    edges = ((x, ix0), (y, iy0), (ix1, x + w), (iy1, y + h))
    if any(abs(a - b) <= 1e-9 for a, b in edges):
        return
    outside = x < ix0 or y < iy0 or x + w > ix1 or y + h > iy1
    event("clipped" if outside else "inside the crop")
    assert mapped.clipped == outside


def test_map_box_examples() -> None:
    box = crop_box_for(700, 500, 256)  # window x in [99.609375, 599.609375], y in [0, 500]
    inner = map_box(200, 100, 50, 40, box)
    assert inner is not None and not inner.clipped
    assert (inner.x, inner.y, inner.width, inner.height) == pytest.approx(
        ((200 - 99.609375) * 0.512, 51.2, 25.6, 20.48)
    )
    full_height = map_box(300, 0, 10, 500, box)
    assert full_height is not None and not full_height.clipped
    assert (full_height.y, full_height.height) == (0.0, 256.0)
    straddling = map_box(50, 100, 100, 40, box)
    assert straddling is not None and straddling.clipped
    assert straddling.x == 0.0 and straddling.width == pytest.approx((150 - 99.609375) * 0.512)
    whole = map_box(0, 0, 700, 500, box)
    assert whole is not None and whole.clipped
    assert (whole.x, whole.y, whole.width, whole.height) == (0.0, 0.0, 256.0, 256.0)


@settings(max_examples=100, deadline=None)
@given(width=dims, height=dims, size=sizes, data=st.data())
def test_map_box_outside_crop_is_none(
    width: int, height: int, size: int, data: st.DataObject
) -> None:
    box = crop_box_for(width, height, size)
    ix0, iy0, ix1, iy1 = _ideal_window(width, height, size)
    side = data.draw(st.sampled_from(["left", "right", "above", "below", "off-image"]))
    if side == "left":  # in the margin the centre crop cuts away
        assume(ix0 >= 1)
        x = data.draw(st.integers(0, int(ix0) - 1))
        w = data.draw(st.integers(1, int(ix0) - x))
        y, h = 0, height
    elif side == "right":  # strictly past the window (touching it: see the test below)
        start = int(ix1) + 1
        assume(start <= width - 1)
        x = data.draw(st.integers(start, width - 1))
        w = data.draw(st.integers(1, width - x))
        y, h = 0, height
    elif side == "above":
        assume(iy0 >= 1)
        y = data.draw(st.integers(0, int(iy0) - 1))
        h = data.draw(st.integers(1, int(iy0) - y))
        x, w = 0, width
    elif side == "below":
        start = int(iy1) + 1
        assume(start <= height - 1)
        y = data.draw(st.integers(start, height - 1))
        h = data.draw(st.integers(1, height - y))
        x, w = 0, width
    else:  # entirely outside the image
        x = data.draw(st.integers(-10_000, -1))
        w = data.draw(st.integers(1, -x))
        y = data.draw(st.integers(0, height - 1))
        h = data.draw(st.integers(1, height))
    assert map_box(x, y, w, h, box) is None


def test_box_on_the_short_edge_is_not_clipped() -> None:
    offenders = []
    for short in range(16, 2001):
        for width, height in ((2 * short, short), (short, 2 * short)):
            for size in SIZES:
                box = crop_box_for(width, height, size)
                cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
                # a thin box from one image edge to the other across the short axis
                if width > height:
                    mapped = map_box(cx - 1, 0, 2, height, box)
                else:
                    mapped = map_box(0, cy - 1, width, 2, box)
                if mapped is None or mapped.clipped:
                    offenders.append((width, height, size))
    assert offenders == [], f"{len(offenders)} cases, first {offenders[:5]}"


def test_box_touching_the_far_edge_from_outside_is_none() -> None:
    offenders = []
    for short in range(16, 2001):
        for size in SIZES:
            # one pixel longer than wide: the window is exactly the top (left) short x short
            portrait = crop_box_for(short, short + 1, size)
            if portrait.as_tuple() == (0, 0, short, short) and (
                map_box(0, short, short, 1, portrait) is not None
            ):
                offenders.append((short, short + 1, size))
            landscape = crop_box_for(short + 1, short, size)
            if landscape.as_tuple() == (0, 0, short, short) and (
                map_box(short, 0, 1, short, landscape) is not None
            ):
                offenders.append((short + 1, short, size))
    assert offenders == [], f"{len(offenders)} cases, first {offenders[:5]}"


# --- 8. failures -----------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` 8-bit grey, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)  # a single all-black scanline
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path / "absent.png")
    with pytest.raises(ImageDecodeError):
        process_image(tmp_path / "absent.png")


def test_truncated_png_is_a_decode_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    whole = _save(rng.integers(0, 256, size=(128, 128), dtype=np.uint8), tmp_path / "whole.png")
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    decode_image(whole)  # the untruncated file is fine
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(cut)
    assert not isinstance(caught.value, DecompressionBombError)


def test_random_bytes_are_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageDecodeError):
        decode_image(path)


@pytest.mark.parametrize(
    ("width", "height"),
    [(60_000, 60_000), (9_000, 9_000)],  # beyond Pillow's own limit; beyond only ours (81 MP)
)
def test_decompression_bomb_is_refused_quickly(tmp_path: Path, width: int, height: int) -> None:
    assert width * height > DEFAULT_MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(width, height))
    assert path.stat().st_size < 1024
    # the file is a PNG that Pillow reads the header of (and, past its limit, refuses itself)
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)
    else:
        with Image.open(path) as probe:
            assert probe.format == "PNG" and probe.size == (width, height)

    start = time.perf_counter()
    with pytest.raises(DecompressionBombError):
        decode_image(path)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded


def test_max_pixels_is_honoured(tmp_path: Path) -> None:
    pixels = np.random.default_rng(8).integers(0, 256, size=(100, 100), dtype=np.uint8)
    path = _save(pixels, tmp_path / "small.png")
    with pytest.raises(DecompressionBombError):
        decode_image(path, max_pixels=5000)
    with pytest.raises(DecompressionBombError):
        process_image(path, PixelOptions(max_pixels=9999))
    decoded = decode_image(path, max_pixels=10_000)  # the limit is inclusive
    np.testing.assert_array_equal(decoded.pixels, pixels)


# --- 9. effective_bits -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixels", "bits"),
    [
        (np.array([[0, 255]], np.uint8), 8),
        (np.array([[0, 7]], np.uint8), 8),
        (np.array([[0, 255]], np.uint16), 8),
        (np.array([[0, 256]], np.uint16), 9),
        (np.array([[0, 4095]], np.uint16), 12),
        (np.array([[4096]], np.uint16), 13),
        (np.array([[1, 65535]], np.uint16), 16),
        (np.zeros((3, 3), np.uint16), 8),
    ],
)
def test_effective_bits(pixels: np.ndarray, bits: int) -> None:
    assert effective_bits(pixels) == bits


@settings(max_examples=100, deadline=None)
@given(peak=st.integers(0, 65535))
def test_effective_bits_is_bit_length_of_the_peak(peak: int) -> None:
    pixels = np.array([[0, peak]], np.uint16)
    assert effective_bits(pixels) == max(8, peak.bit_length())


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    peak=st.integers(0, 65535),
    data=st.data(),
)
def test_16bit_peak_read_in_place_is_the_maximum(
    width: int, height: int, peak: int, data: st.DataObject
) -> None:
    """The in-place maximum of an I;16 image (Arrow view) is the maximum, wherever it lies."""
    rng = np.random.default_rng(peak)
    pixels = rng.integers(0, peak + 1, size=(height, width), dtype=np.uint16)
    pixels[data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))] = peak
    image = Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    found = _sixteen_bit_peak(image)
    assert found is None or found == peak
    if hasattr(image, "__arrow_c_array__"):
        assert found == peak  # a small image is one memory block: the fast path is taken


def test_16bit_peak_of_a_multi_block_image_falls_back(tmp_path: Path) -> None:
    """3000x3000 16-bit is more than one of Pillow's 16 MiB blocks: no in-place view, and
    decoding still finds the peak (through getextrema), here in the last row."""
    pixels = np.zeros((3000, 3000), np.uint16)
    pixels[-1, 5] = 2100
    image = Image.frombytes("I;16", (3000, 3000), pixels.tobytes())
    assert _sixteen_bit_peak(image) is None
    path = _save(pixels, tmp_path / "large.png")
    assert decode_image(path, png_decoder=PngDecoder.pillow).bits == 12


_FAULTS_PER_IMAGE = """
import resource, sys
from pathlib import Path
from machex.imaging import PixelOptions, process_image
from machex.imaging.memory import keep_freed_memory
tuned = sys.argv[2] == "1" and keep_freed_memory()
path = Path(sys.argv[1])
for _ in range(3):
    process_image(path, PixelOptions())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    process_image(path, PixelOptions())
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(
    not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only"
)
def test_build_workers_reuse_freed_image_memory(tmp_path: Path) -> None:
    """After ``keep_freed_memory`` a worker maps no fresh pages per large 16-bit image (a
    2400x2400 one needs ~9,000 4 KiB pages of buffers)."""
    pixels = np.random.default_rng(3).integers(0, 4096, size=(2400, 2400), dtype=np.uint16)
    path = _save(pixels, tmp_path / "large.png")
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_PER_IMAGE)
    result = subprocess.run(
        [sys.executable, str(script), str(path), "1"], capture_output=True, text=True, check=True
    )
    tuned, faults = result.stdout.split()
    assert tuned == "True"
    assert float(faults) < 300, result.stdout


_WORKER_IMPORTS = """
import sys
from pathlib import Path
from machex.assemble import build_in_worker  # what a loky worker imports
from machex.imaging import PixelOptions, PngDecoder, process_image
for decoder in ("pillow", "auto"):
    process_image(Path(sys.argv[1]), PixelOptions(png_decoder=PngDecoder(decoder)))
print(sorted({m.split(".")[0] for m in sys.modules} & {"pyarrow", "pandas", "torch"}))
"""


def test_a_worker_decoding_16bit_pngs_imports_no_heavy_library(tmp_path: Path) -> None:
    """pyarrow, pandas or torch in a build worker costs tens of MiB each: the 16-bit peak
    once pulled in pyarrow (151 MiB per worker on PadChest-sized files instead of 83)."""
    pixels = np.random.default_rng(4).integers(0, 4096, size=(300, 200), dtype=np.uint16)
    path = _save(pixels, tmp_path / "deep.png")
    result = subprocess.run(
        [sys.executable, "-c", _WORKER_IMPORTS, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout


# --- 10. encoding ----------------------------------------------------------------------


def test_jpeg_encoding_is_deterministic() -> None:
    pixels = _smooth(np.random.default_rng(10), 256, 256)
    first = encode(pixels, Encoding.jpeg)
    second = encode(pixels.copy(), Encoding.jpeg)
    assert first == second
    image = _open(first)
    assert image.format == "JPEG" and image.mode == "L" and image.size == (256, 256)
    diff = np.abs(np.asarray(image).astype(np.int16) - pixels.astype(np.int16))
    assert diff.mean() < 2  # quality 95 on a smooth image


def test_crop_box_helpers_are_consistent() -> None:
    box = CropBox(10.0, 0.0, 110.0, 100.0, 50, 100.0)
    assert box.scale == 0.5
    assert box.to_output(10, 0) == (0, 0)
    assert box.to_output(110, 100) == (50, 50)
    assert box.to_original(25, 25) == (60, 50)


@pytest.mark.parametrize("channels", [2, 3, 4], ids=["grey-alpha", "rgb", "rgba"])
def test_a_16bit_colour_png_keeps_all_16_bits(
    tmp_path: Path, channels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow opens a 16-bit RGB / grey + alpha PNG as 8-bit, keeping each sample's high
    byte: 12-bit content came out 16 times too dark. It now decodes as the grey PNG of the
    same content does; without imagecodecs it is refused, not darkened."""
    imagecodecs = pytest.importorskip("imagecodecs")
    from machex.imaging import png

    ramp = _diagonal_ramp(128, 4095).astype(np.uint16)
    grey = _save(ramp, tmp_path / "grey.png")
    planes = [ramp] * (1 if channels == 2 else 3) + [np.full_like(ramp, 65535)] * (channels != 3)
    path = tmp_path / "colour.png"
    path.write_bytes(imagecodecs.png_encode(np.stack(planes, axis=-1)))
    with Image.open(path) as image:
        assert image.mode in ("LA", "RGB", "RGBA")  # what Pillow makes of it
    options = PixelOptions(encoding=Encoding.png, image_size=64)
    result = process_image(path, options)
    assert result.bits == 12 and result.data == process_image(grey, options).data
    monkeypatch.setattr(png, "imagecodecs_available", lambda: False)
    with pytest.raises(ImageDecodeError, match=r"colour\.png: a 16-bit colour PNG"):
        process_image(path, options)
