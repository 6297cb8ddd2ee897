"""File -> single-channel pixel array, with the intensity rule of MaCheX.

The paper applies no histogram equalisation and no per-image standardisation, so 8-bit
pixels pass unchanged. Deeper images are mapped from ``[0, 2**b - 1]`` where ``b`` is the
smallest bit depth covering the image's real maximum: a 12-bit PadChest PNG stored in a
16-bit container spans the full output range instead of 16 grey levels (what a fixed
``>> 8`` would give).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from machex.imaging.dicom import is_dicom, read_dicom
from machex.imaging.errors import DecompressionBombError, ImageDecodeError, transparency_reason
from machex.imaging.intensity import bits_for_peak
from machex.imaging.png import (
    PngDecoder,
    decode_gray_png,
    decode_sixteen_bit_colour,
    is_sixteen_bit_colour,
    plain_gray_depth,
)

#: Default ceiling on decoded pixels. The largest chest radiographs are ~4300x4300 (18.5 MP);
#: anything far beyond is a corrupt header or a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Decoded:
    """A single-channel image: ``image`` is a Pillow image in mode ``L`` (8-bit) or ``F``
    (deeper: whole values 0..65535 held exactly in float32, the type it is resampled in);
    ``bits`` is the smallest depth covering its maximum (>= 8).

    It stays a Pillow image: copying a 2800x2800 16-bit image into numpy costs a quarter
    of its PNG decode. ``width, height`` are the file's own size. ``reduction`` is 1, or the
    JPEG DCT scale (2, 4, 8) it was decoded at: pixel ``i`` then covers original pixels
    ``[i * reduction, (i + 1) * reduction)``.
    """

    image: Image.Image
    bits: int
    width: int
    height: int
    reduction: int = 1
    #: DICOM only: the file's (centre, width) when asked for, whether a VOI LUT was applied
    #: in decoding, and the allow-listed header fields (``dicom.HEADER_ALLOW_LIST``).
    window: tuple[float, float] | None = None
    windowed: bool = False
    header: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def pixels(self) -> np.ndarray:
        """The pixels as a uint8 or uint16 array (a copy)."""
        if self.image.mode == "L":
            return np.asarray(self.image)
        return np.asarray(self.image, dtype=np.float32).astype(np.uint16)


def effective_bits(pixels: np.ndarray) -> int:
    """Smallest bit depth ``b >= 8`` with ``max(pixels) <= 2**b - 1``."""
    if pixels.dtype == np.uint8:
        return 8
    return bits_for_peak(int(pixels.max()) if pixels.size else 0)


@contextmanager
def open_checked(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` with the pixel-count guard applied to the header, before any pixel is
    decoded, and every decoder error turned into an ``ImageDecodeError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DecompressionBombError(
                        f"{path.name}: {width}x{height} = {width * height:,} pixels exceeds "
                        f"the limit of {max_pixels:,}"
                    )
                yield image
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecompressionBombError(f"{path.name}: {error}") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as error:
        raise ImageDecodeError(f"cannot decode {path.name}: {error}") from None


def decode_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short_edge: int | None = None,
    voi: bool = False,
    png_decoder: PngDecoder = PngDecoder.auto,
) -> Decoded:
    """Decode a PNG (8- or 16-bit), JPEG (grayscale or RGB) or DICOM into one channel.

    DICOM files (by name, ``dicom.DICOM_SUFFIXES``) go through ``dicom.read_dicom``;
    ``voi`` asks it for the file's VOI LUT or window.

    With ``min_short_edge``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    whose short edge still has at least that many pixels, and straight to grayscale: the
    decoder skips inverse-DCT and colour work the resize would throw away (on grainy
    MIMIC-sized files decoding is entropy-bound, so the gain is modest: 1.06-1.17x).
    ``png_decoder`` picks who decodes plain grayscale PNGs (``machex.imaging.png``); the
    pixels are the same either way. Raises ``ImageDecodeError`` (or
    ``DecompressionBombError``) naming the file and the reason; never returns a partially
    decoded image. A radiograph is opaque: an image with any transparent pixel (an alpha
    channel below its maximum, or a palette entry with alpha) is refused, since its one
    channel would show what lies under the transparent area (``_refuse_transparency``).
    """
    if is_dicom(path):
        dicom = read_dicom(path, max_pixels=max_pixels, voi=voi)
        return Decoded(
            dicom.image,
            dicom.bits,
            dicom.width,
            dicom.height,
            window=dicom.window,
            windowed=dicom.windowed,
            header=dicom.header,
        )
    with open_checked(path, max_pixels) as image:
        width, height = image.size
        colour = image.mode in ("RGB", "RGBA", "LA")  # grey PNGs alone go to imagecodecs
        if image.format == "PNG" and colour:
            with open(path, "rb") as handle:
                head = handle.read(29)  # the signature and IHDR: the sample depth
            if is_sixteen_bit_colour(head):
                try:
                    pixels = decode_sixteen_bit_colour(path.read_bytes())
                except ValueError as error:
                    raise ImageDecodeError(f"{path.name}: {error}") from None
                single, bits = _from_gray_array(pixels)
                return Decoded(single, bits, width, height)
        elif image.format == "PNG" and png_decoder.use_imagecodecs():
            data = path.read_bytes()
            depth = plain_gray_depth(data)
            pixels = decode_gray_png(data, depth) if depth is not None else None
            if pixels is not None and pixels.shape == (height, width):
                single, bits = _from_gray_array(pixels)
                return Decoded(single, bits, width, height)
        if min_short_edge is not None and image.format == "JPEG":
            factor = min_short_edge / min(width, height)
            if factor < 1:
                image.draft("L", (math.ceil(width * factor), math.ceil(height * factor)))
        image.load()
        _refuse_transparency(image, path)
        single, bits = _to_single_channel(image, path)
        reduction = max(1, round(width / single.size[0]))
        return Decoded(single, bits, width, height, reduction)


def _refuse_transparency(image: Image.Image, path: Path) -> None:
    """An ``ImageDecodeError`` where any pixel of ``image`` is transparent, even in part.

    Converting to one channel drops the alpha, so a half-transparent image would decode as
    if opaque, showing whatever values lie under its transparent area. A fully opaque alpha
    channel (some ChestX-ray14 PNGs are RGBA) and a grey or truecolour transparency key pass,
    and the image decodes as it did before this check.
    """
    found = _transparent_pixels(image)
    if found is None:
        return
    transparent, marked = found
    count = int(np.count_nonzero(transparent))
    if count:
        reason = transparency_reason(count, transparent.size, marked)
        raise ImageDecodeError(f"{path.name}: {reason}")


def _transparent_pixels(image: Image.Image) -> tuple[np.ndarray, str] | None:
    """(a boolean mask of the transparent pixels, what marks them), or None where nothing
    can be hidden: no alpha band and no palette alpha, or an alpha band that is 255
    throughout. A tRNS colour key of a grey or truecolour PNG hides nothing (its pixels keep
    their values, the key's) and passes."""
    alpha_band = next((band for band in ("A", "a") if band in image.getbands()), None)
    if alpha_band is not None:
        alpha = image.getchannel(alpha_band)
        if alpha.getextrema()[0] == 255:  # opaque: no array made
            return None
        return np.asarray(alpha) < 255, "alpha < 255"
    key = image.info.get("transparency")
    if key is None or image.mode != "P":
        return None
    # An index (GIF, one tRNS entry) or one alpha per palette entry: the palette's colour
    # under a transparent entry is not what the image shows.
    alphas = np.full(256, 255, np.uint8)
    if isinstance(key, bytes):
        table = np.frombuffer(key[:256], np.uint8)
        alphas[: table.size] = table
    elif isinstance(key, int) and 0 <= key < 256:
        alphas[key] = 0
    return alphas[np.asarray(image)] < 255, "palette entries with alpha < 255"


def _to_single_channel(image: Image.Image, path: Path) -> tuple[Image.Image, int]:
    """Mode ``L`` for 8-bit and colour input, ``F`` for 16-bit; and the effective bits.
    ``path`` names the file in errors."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        high = _sixteen_bit_peak(image)
        single = image.convert("F")
        if high is None:
            low, peak = single.getextrema()
            if low < 0 or peak > 65535:
                raise ImageDecodeError(f"{path.name}: {mode} image with values outside 0..65535")
            high = int(peak)
        bits = bits_for_peak(high)
    elif mode == "L":
        single, bits = image, 8
    elif mode in ("1", "RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr"):
        single, bits = image.convert("L"), 8
    else:
        raise ImageDecodeError(f"{path.name}: unsupported image mode {mode!r}")
    if single.size[0] == 0 or single.size[1] == 0:
        raise ImageDecodeError(f"{path.name}: empty image of size {single.size}")
    return single, bits


def _from_gray_array(pixels: np.ndarray) -> tuple[Image.Image, int]:
    """What ``_to_single_channel`` gives for a uint8 or uint16 grayscale array."""
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels), 8
    # Through I;16 (a view of the array): 5 ms for 2800x2800, against ~40 ms for numpy's
    # float32 copy handed to Pillow.
    return Image.fromarray(pixels).convert("F"), effective_bits(pixels)


def _sixteen_bit_peak(image: Image.Image) -> int | None:
    """The maximum of an ``I;16`` image, read in place through Pillow's Arrow export: 2 ms
    for 2800x2800 against 7 ms for ``getextrema``. None where there is no such view (other
    modes, Pillow < 11.2, an image spread over several of Pillow's 16 MiB memory blocks).

    The export is read with nanoarrow (2 MiB once imported), not pyarrow: importing pyarrow
    raised a build worker's peak memory on 16-bit PNGs from 79 to 151 MiB.
    """
    if image.mode not in ("I;16", "I;16L") or not hasattr(image, "__arrow_c_array__"):
        return None
    import nanoarrow  # only here: build workers that never see a 16-bit image skip the import

    try:
        view = nanoarrow.c_array(image).view()
        values = np.frombuffer(view.buffer(1), dtype="<u2")
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return None
    count = image.size[0] * image.size[1]
    if view.offset != 0 or view.length != count or values.size != count:
        return None
    return int(values.max()) if count else 0
