"""``--compat machex-v1``: the original MaCheX per-image pixels, for models trained on them.

The released Cheff weights saw images made this way, so reproducing them matters more than
quality here: PIL open, 16-bit values shifted right by 8, RGB, bilinear resize of the short
edge to 1024 with torchvision's integer rules (long edge truncated, crop offset rounded),
centre crop, RGB JPEG quality 95. ``docs/sources.md`` lists how the default mode differs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from machex.imaging.decode import DEFAULT_MAX_PIXELS, effective_bits, open_checked
from machex.imaging.geometry import CropBox

MACHEX_V1 = "machex-v1"
COMPAT_MODES = (MACHEX_V1,)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def machex_v1_pixels(
    path: Path, size: int = 1024, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, CropBox, int, int, int]:
    """(JPEG bytes, crop box, width, height, bits) as the original pipeline made them.

    The crop box is approximate to a fraction of a source pixel: truncating the long edge
    stretches that axis very slightly, which one ``CropBox`` scale cannot express.
    """
    with open_checked(path, max_pixels) as image:
        image.load()
        width, height = image.size
        if image.mode in _SIXTEEN_BIT:
            values = np.asarray(image)
            bits = effective_bits(values.astype(np.uint16))
            image = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))
        else:
            bits = 8
        rgb = image.convert("RGB")
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
    return buffer.getvalue(), box, width, height, bits
