"""Per-image reconstruction metrics (MSE, PSNR, SSIM) and their summary over a test set.

Every function takes (B, C, H, W) tensors and returns one value per image, so that means,
spreads and worst cases are all computed from the same per-image numbers. They compute in
float64 on the CPU and float32 elsewhere, whatever the dtype of the model that produced
``pred``: a bf16 reconstruction scored in bf16 would lose the third decimal of the SSIM.

PSNR is per image, ``10 log10(data_range^2 / MSE)``, and is averaged over images afterwards (the
paper's Table 2 pairs MSE 0.0005 with PSNR 36.80, which an aggregate ``10 log10(1 / 0.0005) =
33.0`` does not give). An exact reconstruction has MSE 0 and PSNR ``+inf``; ``summarize`` leaves
such values out of the mean and counts them, rather than letting one image make the mean inf.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

#: SSIM as in Wang et al. (2004) and the paper: 11 x 11 Gaussian window, sigma 1.5.
SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 where it is cheap and exact enough to be a reference (CPU), float32 elsewhere
    (MPS has no float64; CUDA float64 is slow and float32 is ample for 256 x 256 means)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            "expected pred and target of one shape (B, C, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    dtype = compute_dtype(pred.device)
    return pred.to(dtype), target.to(dtype)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each image over its channels and pixels: (B,)."""
    pred, target = _pair(pred, target)
    return (pred - target).square().flatten(1).mean(1)


def psnr_from_mse(values: Tensor, data_range: float = 1.0) -> Tensor:
    """``10 log10(data_range^2 / mse)`` elementwise; ``+inf`` where the MSE is 0."""
    return 10.0 * torch.log10(data_range**2 / values)


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of each image in dB: (B,); ``+inf`` for identical images."""
    return psnr_from_mse(mse(pred, target), data_range)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity of each image: (B,), the mean of the SSIM map over its channels
    and pixels.

    torchmetrics' implementation: Gaussian window 11 x 11 with sigma 1.5 (its size is derived
    from sigma, ``2 * int(3.5 sigma + 0.5) + 1 = 11``), K1 0.01, K2 0.03, and the images
    reflect-padded by 5 pixels so that the map covers every pixel (scikit-image instead
    averages over the valid interior only; the two differ slightly at the borders).
    """
    pred, target = _pair(pred, target)
    values = structural_similarity_index_measure(
        pred,
        target,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=float(data_range),
        k1=SSIM_K1,
        k2=SSIM_K2,
        reduction="none",
    )
    return values.reshape(pred.shape[0])


def image_metrics(pred: Tensor, target: Tensor, data_range: float = 1.0) -> dict[str, Tensor]:
    """``{"mse", "psnr", "ssim"}``, each (B,), from one pass (the MSE is computed once)."""
    errors = mse(pred, target)
    return {
        "mse": errors,
        "psnr": psnr_from_mse(errors, data_range),
        "ssim": ssim(pred, target, data_range),
    }


def summarize(values: np.ndarray | Tensor) -> dict[str, float | int | None]:
    """Mean, standard deviation (over images, ddof 0), min and max of the finite values.

    ``n`` counts the finite values the statistics are over; ``n_inf`` counts ``+inf`` (PSNR of
    an exact reconstruction) and ``n_nan`` counts NaN (a model that produced NaN), both left
    out of the statistics and reported so that neither goes unnoticed. With no finite value
    the statistics are ``None``.
    """
    array = np.asarray(
        values.detach().cpu().numpy() if isinstance(values, Tensor) else values, np.float64
    ).reshape(-1)
    finite = array[np.isfinite(array)]
    stats: dict[str, float | int | None] = {
        "mean": None,
        "std": None,
        "min": None,
        "max": None,
        "n": int(finite.size),
        "n_inf": int(np.isposinf(array).sum() + np.isneginf(array).sum()),
        "n_nan": int(np.isnan(array).sum()),
    }
    if finite.size:
        stats.update(
            mean=float(finite.mean()),
            std=float(finite.std()),
            min=float(finite.min()),
            max=float(finite.max()),
        )
    return stats


def psnr_of_mean_mse(mean_mse: float | None, data_range: float = 1.0) -> float | None:
    """The aggregate PSNR ``10 log10(range^2 / mean MSE)``: not what the paper reports (see the
    module docstring), kept beside the per-image mean to show the difference."""
    if mean_mse is None or not math.isfinite(mean_mse):
        return None
    return math.inf if mean_mse == 0 else 10.0 * math.log10(data_range**2 / mean_mse)
