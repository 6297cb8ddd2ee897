"""``--compat machex-v1``: the original MaCheX per-image pixels, for models trained on them.

The released Cheff weights saw images made this way, so reproducing them matters more than
quality here: PIL open, 16-bit values shifted right by 8, RGB, bilinear resize of the short
edge to 1024 with torchvision's integer rules (long edge truncated, crop offset rounded),
centre crop, RGB JPEG quality 95; DICOMs (VinDr-CXR) stretched min..max to 8 bits as the
original did. ``docs/pixels.md`` lists how the default mode differs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from machex.imaging.decode import DEFAULT_MAX_PIXELS, effective_bits, open_checked
from machex.imaging.dicom import allowed_header, check_header, is_dicom, open_dicom
from machex.imaging.errors import ImageDecodeError
from machex.imaging.geometry import CropBox

MACHEX_V1 = "machex-v1"
COMPAT_MODES = (MACHEX_V1,)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def machex_v1_pixels(
    path: Path, size: int = 1024, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, CropBox, int, int, int, dict[str, str | int | float]]:
    """(JPEG bytes, crop box, width, height, bits, DICOM allow-listed header) as the original
    pipeline made them (the header is ours: the same metadata as the default mode).

    The crop box is approximate to a fraction of a source pixel: truncating the long edge
    stretches that axis very slightly, which one ``CropBox`` scale cannot express.
    """
    header: dict[str, str | int | float] = {}
    if is_dicom(path):
        gray, bits, header = _v1_dicom(path, max_pixels)
    else:
        with open_checked(path, max_pixels) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT:
                values = np.asarray(image)
                bits = effective_bits(values.astype(np.uint16))
                gray = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))
            else:
                gray, bits = image.copy(), 8
    width, height = gray.size
    rgb = gray.convert("RGB")
    short = min(width, height)
    if width <= height:
        resized = (size, int(size * height / width))
    else:
        resized = (int(size * width / height), size)
    rgb = rgb.resize(resized, Image.Resampling.BILINEAR)
    left = int(round((resized[0] - size) / 2.0))
    top = int(round((resized[1] - size) / 2.0))
    rgb = rgb.crop((left, top, left + size, top + size))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=95)
    sx, sy = width / resized[0], height / resized[1]
    box = CropBox(left * sx, top * sy, (left + size) * sx, (top + size) * sy, size, float(short))
    return buffer.getvalue(), box, width, height, bits, header


def _v1_dicom(path: Path, max_pixels: int) -> tuple[Image.Image, int, dict[str, str | int | float]]:
    """The original VinDr-CXR rule: ``BitsStored`` forced to 16 (here: to ``BitsAllocated``,
    which is 16 for every VinDr file and keeps 8-bit files decodable), the stored values (no
    modality LUT, no MONOCHROME1 inversion) stretched min..max, ``uint8(x * 255)``
    (truncated). Our header checks still refuse colour and multi-frame files."""
    dataset = open_dicom(path)
    check_header(dataset, path, max_pixels)
    header = allowed_header(dataset)
    dataset.BitsStored = dataset.BitsAllocated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is this file's failure
        raise ImageDecodeError(f"{path.name}: pixel data does not decode: {exc}") from None
    bits = effective_bits(stored.astype(np.uint16)) if stored.dtype != np.uint8 else 8
    low, high = float(stored.min()), float(stored.max())
    scaled = (stored - low) / (high - low) if high > low else np.zeros(stored.shape)
    return Image.fromarray(np.uint8(scaled * 255)), bits, header
