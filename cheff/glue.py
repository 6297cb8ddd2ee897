"""How the cascade's stages hand images to each other, as the official tutorial does.

The autoencoder decodes to 3 channels in about [-1, 1]; the super-resolution model takes one
grey channel in [0, 1]. The official glue goes through 8-bit PIL images: (x + 1) / 2 clamped,
times 255 and **truncated**, then PIL's ``convert("L")`` (ITU-R 601-2 luma in fixed point:
``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``), back to [0, 1] by / 255. The cascade and
the SR fine-tuning (which learns the autoencoder's blur) both use :func:`official_glue`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: PIL's ``L = R * 299/1000 + G * 587/1000 + B * 114/1000`` in 16-bit fixed point.
_LUMA = (19595, 38470, 7471)


def official_glue(decoded: Tensor) -> Tensor:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, 1, H, W) in [0, 1], 256 levels."""
    if decoded.ndim != 4 or decoded.shape[1] != 3:
        raise ValueError(f"expected decoder output (B, 3, H, W), got {tuple(decoded.shape)}")
    rgb = ((decoded.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.int64)  # truncation
    r, g, b = rgb.unbind(1)
    luma = (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b + 0x8000) >> 16
    return (luma.float() / 255)[:, None]
