"""The optional faster PNG decoder: imagecodecs' libpng, for plain grayscale radiographs.

``pip install machex-cheff[fast]`` adds imagecodecs. On one core of the benchmark machine it
decodes an 8-bit ChestX-ray14-like PNG in 0.86 and a 16-bit PadChest-like one in 0.92 of
Pillow's time (docs/benchmarks.md). PNG is lossless, so both give the same pixels and the output
bytes do not depend on the decoder (tested): the choice is not part of a build's
fingerprint. Only what radiographs use takes this path, a non-interlaced grayscale PNG of 8
or 16 bits without a transparency chunk; everything else (colour, palette, alpha, 1-4 bit,
interlaced), and any file libpng refuses, goes to Pillow, whose conversions to one channel
and whose errors are the reference. Transparency is refused on either path (an alpha channel
or palette alpha that makes any pixel transparent): a radiograph is opaque; a tRNS colour
key hides nothing and passes.
"""

from __future__ import annotations

import functools
import struct
from enum import Enum

import numpy as np

from machex.imaging.errors import transparency_reason

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: IHDR colour type of grayscale without alpha.
_GRAY = 0


class PngDecoder(str, Enum):
    """``auto``: imagecodecs where installed, else Pillow; ``pillow``: always Pillow;
    ``imagecodecs``: require imagecodecs (an error where it is missing)."""

    auto = "auto"
    pillow = "pillow"
    imagecodecs = "imagecodecs"

    def use_imagecodecs(self) -> bool:
        """Whether PNGs go to imagecodecs; a ValueError for ``imagecodecs`` without the
        package (a set-up error, not a property of any file)."""
        if self is PngDecoder.pillow:
            return False
        if imagecodecs_available():
            return True
        if self is PngDecoder.imagecodecs:
            raise ValueError(
                "--png-decoder imagecodecs needs the imagecodecs package: "
                "pip install 'machex-cheff[fast]'"
            )
        return False


@functools.cache
def imagecodecs_available() -> bool:
    """Whether imagecodecs and its PNG codec import here (once per process). An installed
    but broken imagecodecs (say, built for another numpy) counts as absent: ``auto`` then
    keeps every PNG with Pillow rather than failing each one."""
    try:
        import imagecodecs

        return callable(getattr(imagecodecs, "png_decode", None))
    except Exception:  # noqa: BLE001 - any failure to load an optional codec means "absent"
        return False


def _ihdr(data: bytes) -> tuple[int, int, int] | None:
    """(bit depth, colour type, interlace) of a PNG's IHDR, which the format puts first;
    None for anything else."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    _, _, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return depth, colour, interlace


def plain_gray_depth(data: bytes) -> int | None:
    """8 or 16 for a non-interlaced grayscale PNG without transparency; None otherwise.

    Reads the IHDR chunk, which the format puts first, and looks for a tRNS chunk among
    the chunks before the first IDAT (where the format requires it to be).
    """
    header = _ihdr(data)
    if header is None or len(data) < 33:
        return None
    depth, colour, interlace = header
    if colour != _GRAY or depth not in (8, 16) or interlace != 0:
        return None
    position = 33
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            return depth
        if kind == b"tRNS":
            return None
        position += length + 12
    return None  # no image data: let Pillow say what is wrong


def decode_gray_png(data: bytes, depth: int) -> np.ndarray | None:
    """The pixels of a plain grayscale PNG (``plain_gray_depth``) as a 2-D uint8 or uint16
    array; None where libpng refuses the file.

    The caller then decodes it with Pillow, so that a file is accepted or refused, and
    explained, exactly as without imagecodecs: libpng is stricter in places (it checks the
    CRC of every data chunk, Pillow does not).
    """
    import imagecodecs  # optional: only where PngDecoder.use_imagecodecs() said so

    try:
        pixels = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError, MemoryError):
        return None
    expected = np.uint8 if depth == 8 else np.uint16
    if pixels.ndim != 2 or pixels.dtype != expected:
        return None
    return pixels


#: IHDR colour types of truecolour, grayscale + alpha and truecolour + alpha.
_WIDE_COLOUR_TYPES = (2, 4, 6)


def is_sixteen_bit_colour(data: bytes) -> bool:
    """Whether ``data`` is a 16-bit truecolour or grayscale + alpha PNG: Pillow opens those as
    8-bit ``RGB`` / ``LA`` / ``RGBA`` and keeps only each sample's high byte (a 12-bit
    radiograph would come out 16 times too dark)."""
    header = _ihdr(data)
    return header is not None and header[0] == 16 and header[1] in _WIDE_COLOUR_TYPES


def decode_sixteen_bit_colour(data: bytes) -> np.ndarray:
    """A 16-bit colour PNG as 2-D uint16 grey, with imagecodecs (all 16 bits): the grey
    channel of grayscale + alpha, else ITU-R 601-2 luma as Pillow's ``convert("L")`` takes it
    for 8-bit colour. Raises ValueError where imagecodecs is missing or refuses the file, or
    where any pixel of an alpha channel is below 65535: the grey under a transparent pixel is
    not what the image shows. The alpha libpng makes of a truecolour file's tRNS colour key
    hides nothing (its pixels keep the key's values) and is dropped."""
    if not imagecodecs_available():
        raise ValueError(
            "a 16-bit colour PNG: Pillow keeps only the high byte of each sample, so it is "
            "not decoded without imagecodecs (pip install 'machex-cheff[fast]'), or convert "
            "it to a grayscale PNG"
        )
    import imagecodecs

    try:
        pixels = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, MemoryError) as error:
        raise ValueError(f"libpng refused it ({error})") from None
    if pixels.ndim != 3 or pixels.dtype != np.uint16:
        raise ValueError(f"decoded as {pixels.dtype} of shape {pixels.shape}")
    header = _ihdr(data)
    if pixels.shape[2] in (2, 4) and header is not None and header[1] in (4, 6):  # has alpha
        alpha = pixels[:, :, -1]
        if alpha.size and alpha.min() < 65535:
            count = int(np.count_nonzero(alpha < 65535))
            raise ValueError(transparency_reason(count, alpha.size, "alpha < 65535"))
    if pixels.shape[2] <= 2:  # grayscale + alpha
        return np.ascontiguousarray(pixels[:, :, 0])
    r, g, b = (pixels[:, :, i].astype(np.uint32) for i in range(3))  # exact: < 2**27
    return np.rint((r * 299 + g * 587 + b * 114) / 1000).astype(np.uint16)
