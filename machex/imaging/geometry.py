"""Short-edge resize and centre crop, and the box arithmetic that goes with them.

The crop box is kept in the *original* pixel frame, so mapping a coordinate from the source
image to the 1024x1024 output (or back) is one affine map, with no hidden rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Output side of MaCheX (paper: short edge resized to 1024, then centre-cropped).
OUTPUT_SIZE = 1024


def resample_filter(scale: float) -> Image.Resampling:
    """The filter for resampling by ``scale`` output pixels per source pixel.

    Pillow's filters are antialiased (their support grows with the reduction), so each is a
    proper low-pass here; the choice trades sharpness for time where the difference is below
    what the JPEG q95 output keeps (docs/benchmarks.md, against a float64 Lanczos reference):
    bicubic to enlarge (CheXpert-small; interpolation is visible there), bilinear (triangle)
    for reductions under 2x (MIMIC-CXR-JPG after the 1/2 DCT-scale decode), and area
    averaging (box) from 2x on (PadChest, DICOMs), as OpenCV's ``INTER_AREA`` does.
    """
    if scale >= 1:
        return Image.Resampling.BICUBIC
    if scale > 0.5:
        return Image.Resampling.BILINEAR
    return Image.Resampling.BOX


@dataclass(frozen=True)
class CropBox:
    """The square window of the original image that becomes the output, in original pixels.

    ``x0, y0, x1, y1`` are floats: the short edge spans the full image, the long edge is
    centred to the nearest output pixel. ``side`` is the window's side, exactly the short
    edge: mapping uses it rather than ``x1 - x0``, whose float rounding would push a point
    on the image edge a hair outside the output frame.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    size: int  # output side in pixels
    side: float  # window side in original pixels (the short edge)

    @property
    def scale(self) -> float:
        """Output pixels per original pixel."""
        return self.size / self.side

    def to_output(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.x0) * self.size / self.side, (y - self.y0) * self.size / self.side

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        return x * self.side / self.size + self.x0, y * self.side / self.size + self.y0

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def reduced(self, factor: int) -> CropBox:
        """The same window in the frame of an image decoded at ``1/factor`` scale."""
        if factor == 1:
            return self
        x0, y0, x1, y1 = (v / factor for v in self.as_tuple())
        return CropBox(x0, y0, x1, y1, self.size, self.side / factor)


def crop_box_for(width: int, height: int, size: int = OUTPUT_SIZE) -> CropBox:
    """The crop window of ``resize short edge to size, then centre crop``.

    The resized long edge is ``round(long * size / short)`` and the crop offset
    ``(resized - size) // 2`` output pixels, as torchvision's ``Resize`` + ``CenterCrop``
    would place it; both are converted back to original pixels. Unlike torchvision, one
    scale serves both axes (no sub-pixel stretch of the long edge to a whole pixel count).
    """
    short = min(width, height)
    resized_w, resized_h = round(width * size / short), round(height * size / short)
    left, top = (resized_w - size) // 2, (resized_h - size) // 2
    # Integer products before the one division keep the short axis exactly [0, short].
    return CropBox(
        left * short / size,
        top * short / size,
        (left + size) * short / size,
        (top + size) * short / size,
        size,
        float(short),
    )


def resample_window(
    image: Image.Image,
    box: CropBox,
    *,
    target_max: int = 255,
    source_min: float = 0.0,
    source_max: float = 255.0,
    clip_source: bool = False,
) -> Image.Image | np.ndarray:
    """Resample the crop window of a mode ``L``, ``I`` or ``F`` image to ``box.size``
    squared (``resample_filter``) and map ``[source_min, source_max]`` to ``[0, target_max]``.

    Only the window is resampled (PIL's ``box=``): the same as resizing the whole image and
    cropping, minus the wasted work. An 8-bit image mapped 0..255 -> 0..255 stays a Pillow
    ``L`` image (untouched when the window is the whole image at the output size). Anything
    else is resampled in float (``F``), clipped first to a DICOM window if ``clip_source``,
    and mapped afterwards on the small output: the map is linear, so it commutes with
    resampling. Returns an ``L`` image (8-bit output) or a uint16 array (``target_max``
    65535).
    """
    size = box.size
    identity = image.size == (size, size) and box.as_tuple() == (0, 0, size, size)
    resample = resample_filter(box.scale)
    plain_8bit = (source_min, source_max, target_max) == (0, 255, 255) and not clip_source
    if image.mode == "L" and plain_8bit:
        if identity:
            return image
        return image.resize((size, size), resample, box=box.as_tuple())
    work = image if image.mode == "F" else image.convert("F")
    if clip_source:
        work = Image.fromarray(np.clip(np.asarray(work, dtype=np.float32), source_min, source_max))
    if not identity:
        work = work.resize((size, size), resample, box=box.as_tuple())
    gain = target_max / max(source_max - source_min, 1e-6)
    if target_max == 255:
        # F -> L clips to 0..255 and truncates: + 0.5 makes it round to nearest.
        return work.point(lambda v: v * gain + (0.5 - source_min * gain)).convert("L")
    mapped = (np.asarray(work, dtype=np.float32) - np.float32(source_min)) * np.float32(gain)
    return np.clip(np.rint(mapped), 0, target_max).astype(np.uint16)


def resize_and_crop(
    pixels: np.ndarray,
    box: CropBox,
    *,
    target_max: float | None = None,
    source_max: float | None = None,
    source_min: float = 0.0,
    clip_source: bool = False,
) -> np.ndarray:
    """``resample_window`` for a uint8 or uint16 array; returns an array.

    ``source_max`` and ``target_max`` default to 255 for uint8 input and are required for
    deeper input.
    """
    if pixels.dtype != np.uint8 and (target_max is None or source_max is None):
        raise ValueError("target_max and source_max are required for non-8-bit input")
    image = Image.fromarray(pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32))
    result = resample_window(
        image,
        box,
        target_max=int(target_max if target_max is not None else 255),
        source_min=source_min,
        source_max=source_max if source_max is not None else 255.0,
        clip_source=clip_source,
    )
    return np.asarray(result)


@dataclass(frozen=True)
class MappedBox:
    """A box in the output frame (``x, y, width, height``), clipped to it."""

    x: float
    y: float
    width: float
    height: float
    clipped: bool


def map_box(x: float, y: float, width: float, height: float, box: CropBox) -> MappedBox | None:
    """Map an original-frame ``xywh`` box into the output frame; ``None`` if it falls outside."""
    ox0, oy0 = box.to_output(x, y)
    ox1, oy1 = box.to_output(x + width, y + height)
    cx0, cy0 = max(ox0, 0.0), max(oy0, 0.0)
    cx1, cy1 = min(ox1, float(box.size)), min(oy1, float(box.size))
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    clipped = (cx0, cy0, cx1, cy1) != (ox0, oy0, ox1, oy1)
    return MappedBox(cx0, cy0, cx1 - cx0, cy1 - cy0, clipped)
