"""Reading a radiograph file as grey values in [0, 1], for every cheff command that takes
images (sampling inputs, upscaling, evaluation).

Integer images of more than 8 bits are scaled by machex's ``raw`` rule (the smallest bit depth
``b >= 8`` that holds the image's maximum, then ``2**b - 1``): a 12-bit radiograph stored in a
16-bit PNG (PadChest's) is not read 16 times too dark, and a 16-bit PNG whose brightest pixel
reaches 32768 (machex's full-range output) is read by 65535. The rule cannot tell a dark 16-bit
image from a 12-bit one: a 16-bit image darker than that is read brighter (by 32767 or less).
Colour images go through PIL's luma. Floating-point and negative values are refused: no rule
says which range they span.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from machex.imaging.intensity import bits_for_peak

#: PIL modes of integer images wider than 8 bits.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I")


def grey_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1] of an opened image (see the module's rule); ``ValueError`` for
    floating-point or negative values."""
    if image.mode == "F":
        raise ValueError(
            "a floating-point image (PIL mode F): expected integer grey values (8 or 16 bit)"
        )
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float32)
        if array.size and float(array.min()) < 0:
            raise ValueError(
                f"negative pixel values (down to {float(array.min()):g}): expected unsigned "
                "integer grey values (8 or 16 bit)"
            )
        peak = float(array.max()) if array.size else 0.0
        return np.clip(array / float(2 ** bits_for_peak(peak) - 1), 0.0, 1.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def read_grey_file(path: str | Path) -> np.ndarray:
    """:func:`grey_pixels` of an image file; ``ValueError`` naming the file when it cannot be
    read (a truncated PNG of an interrupted run, a floating-point TIFF, ...)."""
    try:
        with Image.open(path) as image:
            return grey_pixels(image)
    except (OSError, ValueError, SyntaxError) as error:  # SyntaxError: PIL's broken-PNG error
        raise ValueError(f"{path}: cannot read the image ({error})") from None
