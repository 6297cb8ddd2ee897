"""Output encodings of MaCheX images."""

from __future__ import annotations

import io
from enum import Enum

import numpy as np
from PIL import Image

#: Paper/MaCheX default: JPEG quality 95.
JPEG_QUALITY = 95
#: zlib level 1: about a fifth of level 6's time for ~17% larger files.
PNG_COMPRESS_LEVEL = 1


class Encoding(str, Enum):
    """``jpeg``: 8-bit grayscale JPEG q95 (default); ``png``: lossless 8-bit;
    ``png16``: 16-bit PNG, full 0..65535 range."""

    jpeg = "jpeg"
    png = "png"
    png16 = "png16"

    @property
    def extension(self) -> str:
        return "jpg" if self is Encoding.jpeg else "png"

    @property
    def max_value(self) -> int:
        return 65535 if self is Encoding.png16 else 255


def encode(pixels: np.ndarray | Image.Image, encoding: Encoding) -> bytes:
    """Encode a 2-D uint8 (jpeg/png) or uint16 (png16) array, or a Pillow image of the
    matching mode (``L``, or ``I;16`` for png16); deterministic bytes.

    Only the pixels are written, never a source file's metadata: Pillow's writers take some
    of it from ``image.info`` (JPEG: ``comment``; PNG: ``icc_profile``, ``transparency``),
    and an image decoded by Pillow keeps its file's ``info`` through ``convert`` and
    ``resize``, so a JPEG's comment (patient text, say) would reach the output, and the output
    bytes would depend on the PNG decoder. A Pillow image is therefore saved from a copy with
    an empty ``info``.
    """
    if isinstance(pixels, Image.Image):
        image = pixels.copy()  # a fresh image: no info, no encoderinfo left from a save
        image.info = {}
    else:
        image = _as_image(pixels, encoding)
    buffer = io.BytesIO()
    if encoding is Encoding.jpeg:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _as_image(pixels: np.ndarray, encoding: Encoding) -> Image.Image:
    if encoding is Encoding.png16:
        # frombytes with an explicit little-endian layout: fromarray's 16-bit mode names
        # differ between Pillow versions.
        height, width = pixels.shape
        return Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    return Image.fromarray(pixels.astype(np.uint8, copy=False))
