"""The optional imagecodecs PNG decoder gives Pillow's pixels, bytes and errors.

PNG files are written here byte by byte where the case needs it (each of the five row
filters, a transparency chunk, a bad checksum), so that both decoders meet every layout a
real radiograph can have.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import load_manifest
from machex.build import read_build_file
from machex.imaging import (
    Encoding,
    ImageDecodeError,
    Intensity,
    PixelOptions,
    PngDecoder,
    decode_image,
    process_image,
)
from machex.imaging import decode as decode_module
from machex.imaging import png as png_module
from machex.imaging.png import PNG_SIGNATURE, plain_gray_depth
from machex.shards import read_member

imagecodecs = pytest.importorskip("imagecodecs", reason="the [fast] extra is not installed")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filtered(rows: np.ndarray, bpp: int, kinds: list[int]) -> bytes:
    """Scanlines of ``rows`` (uint8 bytes, one row per line) under PNG filter ``kinds[y % n]``
    (0 none, 1 sub, 2 up, 3 average, 4 Paeth), as the specification defines them."""
    out = []
    previous = np.zeros(rows.shape[1], np.int32)
    for y, row in enumerate(rows.astype(np.int32)):
        kind = kinds[y % len(kinds)]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), previous[:-bpp]])
        if kind == 0:
            predicted = np.zeros_like(row)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = previous
        elif kind == 3:
            predicted = (left + previous) // 2
        else:
            p = left + previous - upper_left
            pa, pb, pc = np.abs(p - left), np.abs(p - previous), np.abs(p - upper_left)
            predicted = np.where(
                (pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, upper_left)
            )
        out.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        previous = row
    return b"".join(out)


def _gray_png(pixels: np.ndarray, kinds: list[int], extra: bytes = b"") -> bytes:
    """A grayscale PNG of a uint8 or uint16 array, row filters ``kinds``, and ``extra``
    chunks between IHDR and IDAT."""
    height, width = pixels.shape
    depth = 8 if pixels.dtype == np.uint8 else 16
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(height, -1)
    data = zlib.compress(_filtered(rows, depth // 8, kinds), 6)
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + extra
        + _chunk(b"IDAT", data[: len(data) // 2])  # two data chunks, as large files have
        + _chunk(b"IDAT", data[len(data) // 2 :])
        + _chunk(b"IEND", b"")
    )


@pytest.fixture
def fast_results(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call, whether imagecodecs decoded the file (False: it went to Pillow)."""
    calls: list[bool] = []
    original = decode_module.decode_gray_png

    def recording(data: bytes, depth: int) -> np.ndarray | None:
        pixels = original(data, depth)
        calls.append(pixels is not None)
        return pixels

    monkeypatch.setattr(decode_module, "decode_gray_png", recording)
    return calls


def _both(path: Path, **options: object) -> tuple[bytes, bytes]:
    """process_image's output with Pillow and with imagecodecs decoding."""
    return tuple(
        process_image(path, PixelOptions(png_decoder=decoder, **options)).data
        for decoder in (PngDecoder.pillow, PngDecoder.imagecodecs)
    )


def _radiograph(rng: np.random.Generator, width: int, height: int, top: int) -> np.ndarray:
    """Smooth shading plus grain, whole values in ``[0, top]``."""
    y, x = np.mgrid[0:height, 0:width]
    shade = (np.sin(x / 37.0) + np.cos(y / 23.0) + 2) / 4 * top
    values = np.clip(np.rint(shade + rng.normal(0, top / 100, shade.shape)), 0, top)
    return values.astype(np.uint8 if top <= 255 else np.uint16)


@pytest.mark.parametrize(
    ("width", "height", "top"),
    [(1024, 1024, 255), (700, 1300, 255), (1300, 1100, 4095), (333, 2100, 65535), (5, 3, 1023)],
)
@pytest.mark.parametrize("kinds", [[0], [1], [2], [3], [4], [4, 1, 3, 0, 2]])
def test_every_row_filter_decodes_to_pillows_pixels(
    tmp_path: Path, width: int, height: int, top: int, kinds: list[int], fast_results: list[bool]
) -> None:
    pixels = _radiograph(np.random.default_rng(width + top), width, height, top)
    path = tmp_path / "gray.png"
    path.write_bytes(_gray_png(pixels, kinds))
    assert plain_gray_depth(path.read_bytes()) == (8 if top <= 255 else 16)
    with Image.open(path) as image:  # the file is what it claims: Pillow reads it back
        np.testing.assert_array_equal(np.asarray(image), pixels)
    fast = decode_image(path, png_decoder=PngDecoder.imagecodecs)
    slow = decode_image(path, png_decoder=PngDecoder.pillow)
    assert fast_results == [True]  # imagecodecs decoded it, Pillow only the second time
    assert (fast.image.mode, fast.bits, fast.width, fast.height) == (
        slow.image.mode,
        slow.bits,
        width,
        height,
    )
    np.testing.assert_array_equal(fast.pixels, pixels)


@pytest.mark.parametrize(
    "extra",
    [
        _chunk(b"sBIT", bytes([12])),  # 12 significant bits: libpng must not shift by 4
        _chunk(b"gAMA", (100000).to_bytes(4, "big")),  # gamma 1.0: must not be applied
        _chunk(b"bKGD", (100).to_bytes(2, "big")),
        _chunk(b"pHYs", struct.pack(">IIB", 5000, 5000, 1)),
        _chunk(b"tEXt", b"Software\x00a radiography console"),
    ],
    ids=["sBIT", "gAMA", "bKGD", "pHYs", "tEXt"],
)
def test_ancillary_chunks_do_not_change_the_pixels(
    tmp_path: Path, extra: bytes, fast_results: list[bool]
) -> None:
    pixels = _radiograph(np.random.default_rng(9), 300, 200, 4095)
    path = tmp_path / "ancillary.png"
    path.write_bytes(_gray_png(pixels, [4, 2], extra=extra))
    fast = decode_image(path, png_decoder=PngDecoder.imagecodecs)
    assert fast_results == [True]
    np.testing.assert_array_equal(fast.pixels, pixels)
    np.testing.assert_array_equal(decode_image(path, png_decoder=PngDecoder.pillow).pixels, pixels)


@pytest.mark.parametrize(
    ("encoding", "intensity"),
    [
        (Encoding.jpeg, Intensity.raw),
        (Encoding.png, Intensity.minmax),
        (Encoding.png16, Intensity.raw),
    ],
)
@pytest.mark.parametrize("top", [255, 4095])
def test_output_bytes_do_not_depend_on_the_decoder(
    tmp_path: Path, encoding: Encoding, intensity: Intensity, top: int, fast_results: list[bool]
) -> None:
    pixels = _radiograph(np.random.default_rng(top), 1400, 1700, top)
    path = tmp_path / "pillow-written.png"
    Image.fromarray(pixels).save(path)  # Pillow's own writer: adaptive filters
    assert plain_gray_depth(path.read_bytes()) == (8 if top <= 255 else 16)
    pillow, fast = _both(path, encoding=encoding, intensity=intensity)
    assert fast_results == [True]
    assert pillow == fast


def test_real_nih_pngs_give_the_same_bytes(real_images: Path, fast_results: list[bool]) -> None:
    paths = sorted(real_images.glob("*.png"))
    for path in paths:
        assert plain_gray_depth(path.read_bytes()) == 8, path.name
        pillow, fast = _both(path)
        assert pillow == fast, path.name
    assert fast_results == [True] * len(paths) and paths


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "1", "I;16RGB"])
def test_other_layouts_stay_with_pillow(
    tmp_path: Path, mode: str, fast_results: list[bool]
) -> None:
    rng = np.random.default_rng(3)
    gray = _radiograph(rng, 96, 80, 255)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    if mode == "I;16RGB":  # 16-bit colour: written by hand, Pillow cannot
        rows = np.repeat(gray.astype(">u2")[:, :, None] * 257, 3, axis=2).view(np.uint8)
        raw = b"".join(b"\x00" + row.tobytes() for row in rows.reshape(80, -1))
        header = struct.pack(">IIBBBBB", 96, 80, 16, 2, 0, 0, 0)
        path.write_bytes(
            PNG_SIGNATURE
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b"")
        )
    else:
        Image.fromarray(gray).convert(mode).save(path)
    assert plain_gray_depth(path.read_bytes()) is None
    pillow, fast = _both(path)
    assert pillow == fast
    assert fast_results == []  # never offered to imagecodecs


def test_transparency_and_interlace_stay_with_pillow(tmp_path: Path) -> None:
    pixels = _radiograph(np.random.default_rng(4), 64, 48, 255)
    with_trns = _gray_png(pixels, [4], extra=_chunk(b"tRNS", b"\x00\x07"))
    assert plain_gray_depth(with_trns) is None
    path = tmp_path / "trns.png"
    path.write_bytes(with_trns)
    pillow, fast = _both(path)
    assert pillow == fast
    interlaced = tmp_path / "interlaced.png"
    interlaced.write_bytes(_gray_png(pixels, [0]))
    data = bytearray(interlaced.read_bytes())
    data[28] = 1  # the IHDR interlace byte (the file no longer decodes: only the test matters)
    assert plain_gray_depth(bytes(data)) is None
    assert plain_gray_depth(b"GIF89a" + bytes(40)) is None
    assert plain_gray_depth(PNG_SIGNATURE) is None


def test_a_bad_data_checksum_is_judged_as_pillow_judges_it(
    tmp_path: Path, fast_results: list[bool]
) -> None:
    """libpng refuses a data chunk whose CRC is wrong, Pillow does not look at it: the file
    then goes to Pillow, and the build gets exactly what it got without imagecodecs."""
    pixels = _radiograph(np.random.default_rng(5), 200, 150, 255)
    data = bytearray(_gray_png(pixels, [2]))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF  # the first data chunk's CRC
    path = tmp_path / "bad-crc.png"
    path.write_bytes(bytes(data))
    with pytest.raises(imagecodecs.PngError):
        imagecodecs.png_decode(bytes(data))
    outcomes = []
    for decoder in (PngDecoder.pillow, PngDecoder.imagecodecs):
        try:
            outcomes.append(process_image(path, PixelOptions(png_decoder=decoder)).data)
        except ImageDecodeError as error:
            outcomes.append(str(error))
    assert fast_results == [False]  # imagecodecs refused it, Pillow decided
    assert outcomes[0] == outcomes[1]


def test_a_truncated_file_is_refused_by_both(tmp_path: Path, fast_results: list[bool]) -> None:
    pixels = _radiograph(np.random.default_rng(6), 300, 300, 4095)
    data = _gray_png(pixels, [4])
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) * 2 // 3])
    messages = []
    for decoder in (PngDecoder.pillow, PngDecoder.imagecodecs):
        with pytest.raises(ImageDecodeError, match="cut.png") as caught:
            decode_image(path, png_decoder=decoder)
        messages.append(str(caught.value))
    assert fast_results == [False]
    assert messages[0] == messages[1]


@pytest.fixture
def without_imagecodecs(monkeypatch: pytest.MonkeyPatch):
    """``import imagecodecs`` fails, as where it is missing or broken; afterwards the
    cached answer given meanwhile is forgotten."""
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    png_module.imagecodecs_available.cache_clear()
    yield
    monkeypatch.undo()
    png_module.imagecodecs_available.cache_clear()


@pytest.mark.usefixtures("without_imagecodecs")
def test_asking_for_imagecodecs_without_it_is_refused_up_front(
    tmp_path: Path, fast_results: list[bool]
) -> None:
    assert not png_module.imagecodecs_available()
    PixelOptions()  # auto does not need it
    with pytest.raises(ValueError, match=r"machex-cheff\[fast\]"):
        PixelOptions(png_decoder=PngDecoder.imagecodecs)
    pixels = _radiograph(np.random.default_rng(7), 64, 64, 4095)
    path = tmp_path / "gray.png"
    path.write_bytes(_gray_png(pixels, [1]))
    # auto falls back to Pillow
    decoded = decode_image(path, png_decoder=PngDecoder.auto)
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert fast_results == []


def test_a_build_is_the_same_with_either_decoder(sample_roots_pristine, tmp_path: Path) -> None:
    """``machex build --png-decoder``: the PadChest sample's 16-bit PNGs give the same
    samples, and build.json says which decoder ran."""
    images = {}
    for decoder in ("pillow", "imagecodecs"):
        out = tmp_path / decoder
        args = ["build", "-s", "padchest", "--root", str(sample_roots_pristine["padchest"])]
        result = CliRunner().invoke(app, [*args, "--out", str(out), "--png-decoder", decoder])
        assert result.exit_code == 0, result.output
        pixels = read_build_file(out)["sources"]["padchest"]["options"]["pixels"]
        assert (pixels["png_decoder"], pixels["png_decoder_here"]) == (decoder, decoder)
        rows = load_manifest(out, "images").sort_values("key")
        images[decoder] = [read_member(out / r.shard, r.offset, r.size) for r in rows.itertuples()]
    assert len(images["pillow"]) >= 5  # the frontal ones of the sample
    assert images["pillow"] == images["imagecodecs"]
