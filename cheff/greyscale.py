"""Reading a radiograph file as grey values in [0, 1], for every cheff command that takes
images (sampling inputs, upscaling, evaluation).

Integer images of more than 8 bits are scaled by machex's ``raw`` rule (the smallest bit depth
``b >= 8`` that holds the image's maximum, then ``2**b - 1``): a 12-bit radiograph stored in a
16-bit PNG (PadChest's) is not read 16 times too dark, and a full-range 16-bit PNG (what machex
writes) is read by 65535 as before. Colour images go through PIL's luma.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from machex.imaging.intensity import bits_for_peak

#: PIL modes of integer images wider than 8 bits.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I")


def grey_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1] of an opened image (see the module's rule)."""
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        return np.clip(array / float(2 ** bits_for_peak(peak) - 1), 0.0, 1.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
