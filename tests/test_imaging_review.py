"""Review fixes in machex.imaging: no source metadata in the output, transparency refused,
every decode error naming its file."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from machex.assemble import build_sample
from machex.imaging import (
    DecompressionBombError,
    Encoding,
    ImageDecodeError,
    PixelOptions,
    PngDecoder,
    decode_image,
    encode,
    process_image,
)
from machex.imaging import png as png_module
from machex.imaging.decode import _to_single_channel
from machex.imaging.errors import transparency_reason
from machex.imaging.png import PNG_SIGNATURE
from machex.records import Failure, ImageRecord

SECRET = b"PATIENT NAME SECRET"
#: JPEG markers that carry metadata: COM, APP1 (EXIF, XMP), APP2 (ICC profile).
_METADATA_MARKERS = {0xFE, 0xE1, 0xE2}


def _decoders() -> list[PngDecoder]:
    """Pillow, and imagecodecs where it is installed."""
    fast = [PngDecoder.imagecodecs] if png_module.imagecodecs_available() else []
    return [PngDecoder.pillow, *fast]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == PNG_SIGNATURE
    kinds, position = [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        kinds.append(kind)
        position += length + 12
    return kinds


def _jpeg_markers(data: bytes) -> list[int]:
    """The markers before the first scan (where all metadata segments are)."""
    assert data[:2] == b"\xff\xd8"
    markers, position = [], 2
    while position + 4 <= len(data) and data[position + 1] != 0xDA:
        markers.append(data[position + 1])
        position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
    return markers


def _assert_no_metadata(data: bytes, encoding: Encoding) -> None:
    assert SECRET not in data and SECRET.lower() not in data
    if encoding is Encoding.jpeg:
        markers = _jpeg_markers(data)
        assert not _METADATA_MARKERS & set(markers), [hex(m) for m in markers]
        info = Image.open(io.BytesIO(data)).info
        assert not {"comment", "icc_profile", "exif", "xmp"} & set(info), info
    else:
        assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}


def _icc_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate (not applied, see docs/pixels.md)
    exif[0x010E] = SECRET.decode()  # ImageDescription
    return exif.tobytes()


def _grain(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- 1. No source metadata reaches the output --------------------------------------------


@pytest.fixture
def jpeg_with_metadata(tmp_path: Path) -> Path:
    """A 1024x1024 grey JPEG (the output size: its pixels pass untouched) with a comment,
    EXIF and an ICC profile."""
    path = tmp_path / "commented.jpg"
    Image.fromarray(_grain((1024, 1024))).save(
        path, quality=95, comment=SECRET, exif=_exif(), icc_profile=_icc_profile()
    )
    with Image.open(path) as image:
        assert image.info["comment"] == SECRET and "icc_profile" in image.info
    return path


@pytest.fixture
def png_with_metadata(tmp_path: Path) -> Path:
    """A 1024x1024 grey PNG with iCCP, eXIf, tEXt, gAMA and pHYs chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET.decode())
    info.add(b"gAMA", struct.pack(">I", 45455))
    path = tmp_path / "profiled.png"
    Image.fromarray(_grain((1024, 1024), 1)).save(
        path, icc_profile=_icc_profile(), exif=_exif(), pnginfo=info, dpi=(300, 300)
    )
    assert {b"iCCP", b"eXIf", b"tEXt", b"gAMA", b"pHYs"} <= set(_png_chunks(path.read_bytes()))
    return path


@pytest.mark.parametrize("encoding", list(Encoding))
def test_a_commented_jpeg_at_the_output_size_leaves_no_metadata(
    jpeg_with_metadata: Path, encoding: Encoding
) -> None:
    result = process_image(jpeg_with_metadata, PixelOptions(encoding=encoding))
    _assert_no_metadata(result.data, encoding)
    with Image.open(jpeg_with_metadata) as source:
        pixels = np.asarray(source)
    # the pixels are those of the source, encoded exactly as a bare array of them
    if encoding is Encoding.png16:
        pixels = pixels.astype(np.uint16) * 257
    assert result.data == encode(pixels, encoding)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_a_png_with_an_icc_profile_gives_the_same_bytes_with_either_decoder(
    png_with_metadata: Path, encoding: Encoding
) -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    data = png_with_metadata.read_bytes()
    assert imagecodecs.png_decode(data).shape == (1024, 1024)  # libpng takes this file
    outputs = [
        process_image(png_with_metadata, PixelOptions(encoding=encoding, png_decoder=decoder))
        for decoder in (PngDecoder.pillow, PngDecoder.imagecodecs)
    ]
    assert outputs[0].data == outputs[1].data
    _assert_no_metadata(outputs[0].data, encoding)
    with Image.open(png_with_metadata) as source:
        pixels = np.asarray(source)
    if encoding is Encoding.png:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(outputs[0].data))), pixels)
    if encoding is Encoding.png16:
        pixels = pixels.astype(np.uint16) * 257
    assert outputs[0].data == encode(pixels, encoding)


def test_a_resized_jpeg_leaves_its_comment_behind(tmp_path: Path) -> None:
    """Pillow's convert and resize carry ``info`` along: the leak was not only at 1024."""
    path = tmp_path / "large.jpg"
    Image.fromarray(_grain((1300, 1100), 2)).save(path, quality=90, comment=SECRET)
    for encoding in Encoding:
        _assert_no_metadata(process_image(path, PixelOptions(encoding=encoding)).data, encoding)


def test_the_real_jpeg_comment_stays_out(real_images: Path) -> None:
    path = real_images / "16747_3_1.jpg"
    with Image.open(path) as source:
        comment = source.info["comment"]
    assert comment.startswith(b"CREATOR: gd-jpeg")
    data = process_image(path).data
    assert comment not in data
    _assert_no_metadata(data, Encoding.jpeg)


def test_a_transparency_key_no_pixel_has_is_not_copied_to_the_output(tmp_path: Path) -> None:
    """A 16-bit PNG whose tRNS key (0) no pixel has is opaque and decodes; its key used to
    reach the 8-bit output PNG, where it made every black output pixel transparent."""
    values = np.random.default_rng(3).integers(1, 4096, (200, 300), dtype=np.uint16)
    keyed, plain = tmp_path / "keyed.png", tmp_path / "plain.png"
    Image.fromarray(values).save(keyed, transparency=0)
    Image.fromarray(values).save(plain)
    assert b"tRNS" in _png_chunks(keyed.read_bytes())
    for encoding in Encoding:
        options = PixelOptions(encoding=encoding)
        data = process_image(keyed, options).data
        _assert_no_metadata(data, encoding)
        assert data == process_image(plain, options).data


@pytest.mark.parametrize("encoding", list(Encoding))
def test_encode_writes_pixels_only(encoding: Encoding) -> None:
    pixels = _grain((64, 80), 4)
    if encoding is Encoding.png16:
        pixels = pixels.astype(np.uint16) * 257
        image = Image.frombytes("I;16", (80, 64), pixels.astype("<u2").tobytes())
        image.info = {"transparency": 0, "icc_profile": _icc_profile()}
    else:
        image = Image.fromarray(pixels)
        image.info = {
            "comment": SECRET,
            "icc_profile": _icc_profile(),
            "exif": _exif(),
            "transparency": 0,
            "dpi": (300, 300),
            "gamma": 0.45455,
        }
    kept = dict(image.info)
    data = encode(image, encoding)
    assert data == encode(pixels, encoding)
    _assert_no_metadata(data, encoding)
    assert image.info == kept  # the caller's image is left as it was


# --- 2. Transparency is refused, opacity changes nothing ---------------------------------

HEIGHT, WIDTH = 48, 64
#: The grey value (8-bit) or colour key that marks the left half transparent.
KEY = 7


def _grey(sixteen: bool) -> np.ndarray:
    """Content without the key value, so a key matches only the pixels set to it."""
    values = np.random.default_rng(5).integers(KEY + 1, 255, (HEIGHT, WIDTH))
    return (values * 16 if sixteen else values).astype(np.uint16 if sixteen else np.uint8)


def _keyed(grey: np.ndarray, transparent: bool, key: int) -> np.ndarray:
    grey = grey.copy()
    if transparent:
        grey[:, : WIDTH // 2] = key
    return grey


def _alpha(dtype: type, transparent: bool) -> np.ndarray:
    top = np.iinfo(dtype).max
    alpha = np.full((HEIGHT, WIDTH), top, dtype)
    if transparent:
        alpha[:, : WIDTH // 2] = top // 2  # half-transparent is transparent too
        alpha[:1, :1] = 0
    return alpha


def _write_la(path: Path, transparent: bool) -> np.ndarray:
    grey = _grey(False)
    Image.fromarray(np.dstack([grey, _alpha(np.uint8, transparent)]), "LA").save(path)
    return grey


def _write_rgba(path: Path, transparent: bool) -> np.ndarray:
    grey = _grey(False)
    Image.fromarray(np.dstack([grey] * 3 + [_alpha(np.uint8, transparent)]), "RGBA").save(path)
    return grey


def _write_la16(path: Path, transparent: bool) -> np.ndarray:
    imagecodecs = pytest.importorskip("imagecodecs")
    grey = _grey(True)
    path.write_bytes(imagecodecs.png_encode(np.dstack([grey, _alpha(np.uint16, transparent)])))
    return grey


def _write_rgba16(path: Path, transparent: bool) -> np.ndarray:
    imagecodecs = pytest.importorskip("imagecodecs")
    grey = _grey(True)
    planes = [grey] * 3 + [_alpha(np.uint16, transparent)]
    path.write_bytes(imagecodecs.png_encode(np.dstack(planes)))
    return grey


def _write_rgb16_trns(path: Path, transparent: bool) -> np.ndarray:
    """16-bit truecolour with a tRNS colour key (libpng makes it an alpha channel)."""
    pytest.importorskip("imagecodecs")
    grey = _keyed(_grey(True), transparent, KEY)
    rows = np.repeat(grey.astype(">u2")[:, :, None], 3, axis=2).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows.reshape(HEIGHT, -1))
    path.write_bytes(
        PNG_SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", WIDTH, HEIGHT, 16, 2, 0, 0, 0))
        + _chunk(b"tRNS", struct.pack(">HHH", KEY, KEY, KEY))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    return grey


def _write_palette_alpha(path: Path, transparent: bool) -> np.ndarray:
    """A palette PNG (Pillow's grey palette: index = value) whose tRNS gives entry KEY alpha
    128."""
    grey = _keyed(_grey(False), transparent, KEY)
    image = Image.fromarray(grey).convert("P")
    image.save(path, transparency=b"\xff" * KEY + b"\x80")
    return grey


def _write_palette_index(path: Path, transparent: bool) -> np.ndarray:
    """A palette PNG whose tRNS makes entry KEY fully transparent (Pillow: an index)."""
    grey = _keyed(_grey(False), transparent, KEY)
    Image.fromarray(grey).convert("P").save(path, transparency=KEY)
    with Image.open(path) as image:
        assert image.mode == "P" and image.info["transparency"] == KEY
    return grey


def _write_grey_trns(path: Path, transparent: bool) -> np.ndarray:
    grey = _keyed(_grey(False), transparent, KEY)
    Image.fromarray(grey).save(path, transparency=KEY)
    return grey


def _write_grey16_trns(path: Path, transparent: bool) -> np.ndarray:
    grey = _keyed(_grey(True), transparent, KEY)
    Image.fromarray(grey).save(path, transparency=KEY)
    with Image.open(path) as image:
        assert image.mode == "I;16" and image.info["transparency"] == KEY
    return grey


def _write_grey4_trns(path: Path, transparent: bool) -> np.ndarray:
    """4-bit grey with tRNS 2: Pillow scales the pixels to 0..255 (2 -> 34), not the key."""
    values = np.random.default_rng(6).integers(3, 16, (HEIGHT, WIDTH)).astype(np.uint8)
    values = _keyed(values, transparent, 2)
    packed = (values[:, 0::2] << 4) | values[:, 1::2]
    raw = b"".join(b"\x00" + row.tobytes() for row in packed)
    path.write_bytes(
        PNG_SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", WIDTH, HEIGHT, 4, 0, 0, 0, 0))
        + _chunk(b"tRNS", struct.pack(">H", 2))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    return values * 17


#: Layouts whose transparency hides what lies under it: refused when any pixel is transparent.
WRITERS: dict[str, Callable[[Path, bool], np.ndarray]] = {
    "la": _write_la,
    "rgba": _write_rgba,
    "la16": _write_la16,
    "rgba16": _write_rgba16,
    "palette-alpha": _write_palette_alpha,
    "palette-index": _write_palette_index,
}
#: tRNS colour keys: the keyed pixels keep their value (the key's), so nothing is hidden.
KEYED: dict[str, Callable[[Path, bool], np.ndarray]] = {
    "rgb16-trns": _write_rgb16_trns,
    "grey-trns": _write_grey_trns,
    "grey16-trns": _write_grey16_trns,
    "grey4-trns": _write_grey4_trns,
}


def _record(path: Path) -> ImageRecord:
    return ImageRecord(
        key=f"probe-{path.stem}",
        source="probe",
        source_key=path.name,
        path=str(path),
        patient_id="p1",
        study_id="s1",
        view="PA",
        split="train",
    )


@pytest.mark.parametrize("layout", list(WRITERS))
def test_a_half_transparent_image_is_refused(tmp_path: Path, layout: str) -> None:
    path = tmp_path / f"{layout}.png"
    WRITERS[layout](path, True)
    half = HEIGHT * WIDTH // 2
    pattern = (
        rf"^{re.escape(path.name)}: 50\.0 % of pixels \({half:,} of {HEIGHT * WIDTH:,}\) are "
        r"transparent \(.+\): expected an opaque radiograph$"
    )
    for decoder in _decoders():
        with pytest.raises(ImageDecodeError, match=pattern) as caught:
            decode_image(path, png_decoder=decoder)
        assert not isinstance(caught.value, DecompressionBombError)
        with pytest.raises(ImageDecodeError, match=pattern):
            process_image(path, PixelOptions(png_decoder=decoder))
    # In a build the refusal is a failure row, not a crash.
    result = build_sample(_record(path), PixelOptions(), tmp_path)
    assert isinstance(result, Failure) and result.error_type == "ImageDecodeError"
    assert re.match(pattern, result.message)


@pytest.mark.parametrize(
    ("layout", "keyed"),
    [(name, False) for name in WRITERS] + [(name, k) for name in KEYED for k in (False, True)],
)
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
def test_an_opaque_image_decodes_as_before(tmp_path: Path, layout: str, keyed: bool) -> None:
    """Fully opaque alpha (some real ChestX-ray14 files are RGBA), or a colour key, whether
    or not pixels have it: the same pixels and output bytes as the plain grey PNG of the
    same content."""
    path = tmp_path / f"{layout}.png"
    grey = {**WRITERS, **KEYED}[layout](path, keyed)
    plain = tmp_path / "plain.png"
    Image.fromarray(grey).save(plain)
    for decoder in _decoders():
        decoded = decode_image(path, png_decoder=decoder)
        np.testing.assert_array_equal(decoded.pixels, grey)
        for encoding in Encoding:
            options = PixelOptions(encoding=encoding, image_size=64, png_decoder=decoder)
            assert process_image(path, options).data == process_image(plain, options).data


def test_an_opaque_rgba_colour_image_is_luma_as_before(tmp_path: Path) -> None:
    rgb = np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    opaque = np.dstack([rgb, np.full((HEIGHT, WIDTH), 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    decoded = decode_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decoded.pixels, np.asarray(Image.fromarray(rgb).convert("L")))
    options = PixelOptions(encoding=Encoding.png, image_size=64)
    assert (
        process_image(tmp_path / "rgba.png", options).data
        == process_image(tmp_path / "rgb.png", options).data
    )


def test_one_transparent_pixel_is_enough(tmp_path: Path) -> None:
    alpha = np.full((1000, 1200), 255, np.uint8)
    alpha[500, 600] = 254
    path = tmp_path / "speck.png"
    Image.fromarray(np.dstack([_grain((1000, 1200)), alpha]), "LA").save(path)
    with pytest.raises(ImageDecodeError, match=r"speck\.png: < 0\.1 % of pixels \(1 of "):
        decode_image(path)


def test_transparency_reason() -> None:
    assert transparency_reason(1, 2, "alpha < 255") == (
        "50.0 % of pixels (1 of 2) are transparent (alpha < 255): expected an opaque radiograph"
    )
    assert transparency_reason(1, 10_000, "x").startswith("< 0.1 % of pixels (1 of 10,000)")
    assert transparency_reason(9_999, 10_000, "x").startswith("> 99.9 % of pixels")
    assert transparency_reason(4, 4, "x").startswith("100.0 % of pixels (4 of 4)")


# --- 3. Every error names the file -------------------------------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height"),
    [(60_000, 60_000), (9_000, 9_000)],  # refused by Pillow itself; by our limit only
)
def test_a_decompression_bomb_error_names_the_file(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(width, height))
    for options in (PixelOptions(), PixelOptions(compat="machex-v1")):
        with pytest.raises(DecompressionBombError, match=r"^bomb\.png: "):
            process_image(path, options)


def test_the_pixel_limit_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(_grain((100, 100))).save(path)
    expected = r"^small\.png: 100x100 = 10,000 pixels exceeds the limit of 5,000$"
    with pytest.raises(DecompressionBombError, match=expected):
        decode_image(path, max_pixels=5000)


def test_an_unsupported_mode_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match=r"^float\.tif: unsupported image mode 'F'$"):
        decode_image(path)


def test_values_outside_the_16_bit_range_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "negative.tif"
    values = np.full((8, 8), 100, np.int32)
    values[0, 0] = -5
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I"
    with pytest.raises(
        ImageDecodeError, match=r"^negative\.tif: I image with values outside 0\.\.65535$"
    ):
        decode_image(path)


def test_an_empty_image_names_the_file() -> None:
    with pytest.raises(ImageDecodeError, match=r"^empty\.png: empty image of size \(0, 0\)$"):
        _to_single_channel(Image.new("L", (0, 0)), Path("empty.png"))
