"""The original MaCheX per-image pipeline, re-implemented as the baseline to beat and match.

The released Cheff weights were trained on the pixels this produces, so it serves twice:
``benchmarks/bench_build.py`` times it against our pipeline, and the tests compare our
``--compat machex-v1`` output with it pixel for pixel. Keep the behaviour (and the name
``machex_v1``) exactly as it is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: Output side of MaCheX.
SIZE = 1024
#: JPEG quality of the original collection.
QUALITY = 95
#: Pillow modes that hold more than 8 bits per pixel.
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def machex_v1(path: str | Path) -> bytes:
    """Encode ``path`` as the original MaCheX code did: 8-bit RGB JPEG quality 95, 1024x1024.

    Steps, in the original order:

    - 16-bit (and ``I``) images are shifted right by 8 (the original ``>> 8``), so 12-bit
      data keeps only its 16 top grey levels;
    - ``convert("RGB")``;
    - torchvision ``Resize(1024)`` on a PIL image: the short edge becomes 1024 and the long
      edge ``int(1024 * long / short)`` (truncated, not rounded), bilinear; a square image
      goes to 1024x1024 (``w == h`` takes the first branch);
    - torchvision ``CenterCrop(1024)``: offsets ``int(round((W - 1024) / 2.0))`` (Python's
      round-half-to-even) on each axis;
    - ``save(format="JPEG", quality=95)`` with Pillow's default subsampling.

    DICOMs (``.dcm``, ``.dicom``; the original read only VinDr-CXR's) take the original's
    DICOM branch first (``_dicom_as_original``).
    """
    if str(path).lower().endswith((".dcm", ".dicom")):
        img = _dicom_as_original(path)
    else:
        img = Image.open(path)
    if img.mode in DEEP_MODES:
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:  # noqa: SIM108 (kept as the original reads)
        new = (SIZE, int(SIZE * h / w))
    else:
        new = (int(SIZE * w / h), SIZE)
    img = img.resize(new, Image.Resampling.BILINEAR)
    W, H = img.size
    left, top = int(round((W - SIZE) / 2.0)), int(round((H - SIZE) / 2.0))
    img = img.crop((left, top, left + SIZE, top + SIZE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def _dicom_as_original(path: str | Path) -> Image.Image:
    """The original VinDr-CXR branch: ``BitsStored = 16``, ``pixel_array``, min-max stretch,
    ``np.uint8(arr * 255)``; no modality LUT and no MONOCHROME1 inversion."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BitsStored = 16
    arr = ds.pixel_array
    arr = (arr - np.min(arr)) / (np.max(arr) - np.min(arr))
    return Image.fromarray(np.uint8(arr * 255))
