"""The super-resolution diffusion model as Cheff ships it: the SR U-Net and its conditioning.

Only what a sampler or trainer calls on the model lives here; the cosine schedule and the
samplers are in ``cheff.diffusion``. The official wrapper conditions on ``2 * lr - 1``
resized to the target size by **bicubic interpolation without antialiasing**
(torchvision 0.12 on tensors; ``align_corners=False``), FORMAT.md section 4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheff.models.sr_unet import SRUNet

if TYPE_CHECKING:
    from cheff.diffusion.schedules import NoiseSchedule

SR_SIZE = 1024  # the released model's output side
LR_SIZE = 256


#: How far outside [0, 1] an image may reach (resampling overshoot, float rounding).
UNIT_TOLERANCE = 1e-3


def check_float_images(images: Tensor, what: str) -> None:
    """Images are floating point in [0, 1]; an integer tensor is refused rather than
    silently read as 0-255 values."""
    if not images.is_floating_point():
        raise ValueError(
            f"{what}: images are floating point in [0, 1], got dtype "
            f"{str(images.dtype).removeprefix('torch.')} (8-bit images: x.float() / 255)"
        )


def check_unit_images(images: Tensor, what: str, tolerance: float = UNIT_TOLERANCE) -> None:
    """Refuse anything but float images in [0, 1] (up to ``tolerance``): 8-bit images
    (uint8, or floats in 0-255) would otherwise run and give a wrong result without a word."""
    check_float_images(images, what)
    if images.numel() == 0:
        return
    low, high = torch.aminmax(images.detach().float())
    low, high = float(low), float(high)
    if not (low >= -tolerance and high <= 1 + tolerance):  # also refuses NaN
        hint = " (8-bit values? divide by 255)" if high > 1.5 else ""
        raise ValueError(f"{what}: values must lie in [0, 1], got [{low:.4g}, {high:.4g}]{hint}")


def sr_condition(low: Tensor, size: int = SR_SIZE) -> Tensor:
    """Low-resolution grey images (B, 1, h, w) in [0, 1] -> the condition (B, 1, size, size)
    in about [-1, 1]: ``2 * low - 1``, bicubic to ``size`` without antialias (official).

    Integer images are refused (:func:`check_float_images`); the value range is checked by
    the callers that take user images (:class:`cheff.upscale.Upscaler`), not here, where
    training calls it every step."""
    if low.ndim != 4 or low.shape[1] != 1:
        raise ValueError(f"expected grey images (B, 1, H, W), got {tuple(low.shape)}")
    check_float_images(low, "low-resolution images")
    return F.interpolate(
        low.float() * 2 - 1, size=(size, size), mode="bicubic", align_corners=False
    )


class SuperResolution(nn.Module):
    """``unet`` predicts the noise of a high-resolution image given its upsampled version.
    ``schedule``: the noise schedule it was trained with, when the file says (our files store
    it, the paper's included); :class:`cheff.Upscaler` samples with it. None: the paper's
    cosine schedule."""

    def __init__(self, unet: SRUNet, schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule  # a plain attribute: not in the state dict, never moved

    def eps(self, x: Tensor, t: Tensor | int, condition: Tensor) -> Tensor:
        """The noise of ``x`` (B, 1, H, W) at ``t`` given ``condition`` (B, 1, H, W)."""
        if condition.shape != x.shape:
            raise ValueError(
                f"condition {tuple(condition.shape)} and target {tuple(x.shape)} differ"
            )
        return self.unet(torch.cat([x, condition], dim=1), t)

    forward = eps
