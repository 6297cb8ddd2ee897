"""Fidelity yardsticks for the per-image pipeline: a float64 reference resampler, PSNR, SSIM.

A fast pipeline is only worth having if its pixels stay close to what an ideal resampler
would produce. The reference here is deliberately slow and simple (dense float64 weight
matrices, no integer shortcuts, no DCT-domain downscaling), so a pipeline can be judged
against it rather than against itself.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from machex.imaging import crop_box_for
from machex.imaging.decode import effective_bits

#: Lanczos lobes (Lanczos-3, as Pillow's ``LANCZOS``).
LANCZOS_A = 3
#: SSIM constants of Wang et al. 2004.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, SSIM_L = 11, 1.5, 0.01, 0.03, 255.0


class Box(Protocol):
    """A crop window in original pixels (``machex.imaging.CropBox`` fits)."""

    x0: float
    y0: float
    x1: float
    y1: float


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Lanczos-3 kernel, zero outside ``(-3, 3)``."""
    return np.where(np.abs(x) < LANCZOS_A, np.sinc(x) * np.sinc(x / LANCZOS_A), 0.0)


def lanczos_weights(n_in: int, start: float, stop: float, size: int) -> np.ndarray:
    """Dense ``(size, n_in)`` matrix resampling ``[start, stop)`` of an axis to ``size`` pixels.

    Output pixel ``j`` is centred on ``start + (j + 0.5) * (stop - start) / size``; pixel
    ``i`` of the input on ``i + 0.5``. When downscaling the kernel is stretched by
    ``1 / scale`` (antialiasing); taps beyond the image are clamped to the edge pixel and
    each row is normalised to sum 1.
    """
    step = (stop - start) / size  # input pixels per output pixel
    stretch = max(step, 1.0)
    support = LANCZOS_A * stretch
    centres = start + (np.arange(size) + 0.5) * step
    taps = int(math.ceil(2 * support)) + 2
    first = np.floor(centres - support - 0.5).astype(np.int64)
    index = first[:, None] + np.arange(taps)[None, :]
    weights = _lanczos((index + 0.5 - centres[:, None]) / stretch)
    matrix = np.zeros((size, n_in), dtype=np.float64)
    rows = np.broadcast_to(np.arange(size)[:, None], index.shape)
    np.add.at(matrix, (rows, np.clip(index, 0, n_in - 1)), weights)
    return matrix / matrix.sum(axis=1, keepdims=True)


def reference_lanczos(pixels: np.ndarray, crop_box: Box, size: int = 1024) -> np.ndarray:
    """The ``size`` x ``size`` output of ``crop_box``, antialiased separable Lanczos-3, float64."""
    pixels = np.asarray(pixels, dtype=np.float64)
    height, width = pixels.shape
    rows = lanczos_weights(height, crop_box.y0, crop_box.y1, size)
    cols = lanczos_weights(width, crop_box.x0, crop_box.x1, size)
    return rows @ pixels @ cols.T


def reference_image(path: Path, size: int = 1024) -> np.ndarray:
    """Decode ``path`` on its own (full scale, no pipeline code), map intensities as the
    default pipeline does (8-bit as-is, deeper ``x * 255 / (2**b - 1)`` with ``b`` the
    effective bit depth), and resample the crop window with ``reference_lanczos``.

    A DICOM (``.dcm``) is read with pydicom's ``pixel_array``; only MONOCHROME2 without
    a modality LUT is taken, where the stored values are the values the rule applies to."""
    if path.suffix.lower() == ".dcm":
        pixels = _dicom_pixels(path)
    else:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                pixels = np.asarray(image).astype(np.uint16)
            else:
                pixels = np.asarray(image.convert("L"))
    bits = effective_bits(pixels)
    values = pixels.astype(np.float64)
    if bits > 8:
        values *= 255.0 / (2**bits - 1)
    height, width = pixels.shape
    return reference_lanczos(values, crop_box_for(width, height, size), size)


def _dicom_pixels(path: Path) -> np.ndarray:
    """Unsigned stored pixels of a MONOCHROME2 DICOM without rescale or LUT."""
    import pydicom

    dataset = pydicom.dcmread(path)
    photometric = str(dataset.PhotometricInterpretation).strip()
    if photometric != "MONOCHROME2" or int(dataset.get("PixelRepresentation", 0)) != 0:
        raise ValueError(f"{path.name}: reference takes unsigned MONOCHROME2 only")
    if (
        "ModalityLUTSequence" in dataset
        or float(dataset.get("RescaleSlope", 1)) != 1
        or float(dataset.get("RescaleIntercept", 0)) != 0
    ):
        raise ValueError(f"{path.name}: reference takes DICOMs without a modality LUT only")
    pixels = dataset.pixel_array
    return pixels if pixels.dtype == np.uint8 else pixels.astype(np.uint16)


def decode_gray(data: bytes) -> np.ndarray:
    """Encoded output bytes -> 2-D float64 grey levels (RGB is converted with Pillow's ``L``)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical arrays)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    L 255, statistics over 'valid' windows only, no downsampling of the inputs."""
    x = torch.from_numpy(np.asarray(a, np.float64))[None, None]
    y = torch.from_numpy(np.asarray(b, np.float64))[None, None]
    g = _gaussian_window()
    vertical, horizontal = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, vertical), horizontal)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * SSIM_L) ** 2, (SSIM_K2 * SSIM_L) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())
