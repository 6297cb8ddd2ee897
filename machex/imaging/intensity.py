"""Which source values map to black and white: the intensity step between decode and resize.

``raw`` is the paper's rule (no equalisation, no per-image standardisation): 8-bit pixels pass
unchanged, deeper ones map ``[0, 2**b - 1]`` to the output range, ``b`` the smallest bit
depth covering the image. ``minmax`` stretches each image's own range; ``window`` applies a
DICOM-style window (centre, width) where the source supplies one and is ``raw`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from PIL import Image


def bits_for_peak(peak: float) -> int:
    """The ``raw`` rule's ``b``: the smallest bit depth ``>= 8`` whose range ``[0, 2**b - 1]``
    holds ``peak`` (a fractional peak counts by its whole part)."""
    return max(8, math.ceil(math.log2(math.floor(peak) + 1))) if peak >= 1 else 8


class Intensity(str, Enum):
    raw = "raw"
    minmax = "minmax"
    window = "window"


@dataclass(frozen=True)
class IntensityRange:
    """Source values ``low -> 0`` and ``high -> full scale``; ``mode`` is what was applied."""

    low: float
    high: float
    mode: Intensity


def intensity_range(
    image: Image.Image,
    bits: int,
    mode: Intensity,
    window: tuple[float, float] | None = None,
) -> IntensityRange:
    """The input range to map onto the output range for ``mode``.

    ``window`` is ``(centre, width)`` as in the DICOM VOI LUT; without one, ``window``
    falls back to ``raw`` (and says so in ``mode``). A flat image under ``minmax`` also
    falls back to ``raw`` rather than dividing by zero.
    """
    raw = IntensityRange(0.0, float(2**bits - 1), Intensity.raw)
    if mode is Intensity.minmax:
        low, high = (float(v) for v in image.getextrema())
        return IntensityRange(low, high, mode) if high > low else raw
    if mode is Intensity.window and window is not None:
        centre, width = window
        if width > 0:
            return IntensityRange(centre - width / 2, centre + width / 2, mode)
    return raw
