"""Pixels: decode -> intensity rule -> resize and crop -> encode. Knows nothing of CSVs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from machex.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    Decoded,
    DecompressionBombError,
    ImageDecodeError,
    decode_image,
)
from machex.imaging.encode import Encoding, encode
from machex.imaging.geometry import (
    OUTPUT_SIZE,
    CropBox,
    MappedBox,
    crop_box_for,
    map_box,
    resize_and_crop,
)


@dataclass(frozen=True)
class PixelOptions:
    """Everything about the pixels that changes the output bytes."""

    encoding: Encoding = Encoding.jpeg
    image_size: int = OUTPUT_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ProcessedImage:
    """The encoded output plus what is needed to map coordinates back to the source."""

    data: bytes
    crop_box: CropBox
    orig_width: int
    orig_height: int
    bits: int


def process_image(
    path: Path,
    encoding: Encoding = Encoding.jpeg,
    *,
    size: int = OUTPUT_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ProcessedImage:
    """Decode ``path``, resize its short edge to ``size``, centre-crop, encode."""
    decoded = decode_image(path, max_pixels=max_pixels)
    box = crop_box_for(decoded.width, decoded.height, size)
    pixels = resize_and_crop(
        decoded.pixels, box, target_max=encoding.max_value, source_max=2**decoded.bits - 1
    )
    return ProcessedImage(
        encode(pixels, encoding), box, decoded.width, decoded.height, decoded.bits
    )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OUTPUT_SIZE",
    "CropBox",
    "DecompressionBombError",
    "Decoded",
    "Encoding",
    "ImageDecodeError",
    "MappedBox",
    "PixelOptions",
    "ProcessedImage",
    "crop_box_for",
    "decode_image",
    "encode",
    "map_box",
    "process_image",
    "resize_and_crop",
]
