"""What every miniature source shares: synthetic radiographs and deterministic writers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_radiograph(
    rng: np.random.Generator, width: int, height: int, *, bits: int = 8
) -> np.ndarray:
    """A chest-radiograph-like grayscale image: uint8 (bits=8) or uint16 with values < 2**bits.

    Dark background, a soft-tissue thorax, two darker elliptical lung fields, a bright
    mediastinum/spine band and heart shadow, smooth gradients and mild noise. ``bits`` <= 8
    gives uint8, 9..16 gives uint16.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    f32 = np.float32
    y = np.linspace(-1.0, 1.0, height, dtype=f32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=f32)[None, :]
    j = rng.uniform(-1.0, 1.0, size=8).astype(f32)  # per-image jitter of the anatomy

    def blob(cx: float, cy: float, rx: float, ry: float, edge: float) -> np.ndarray:
        """1 inside an ellipse, falling smoothly to 0 across a band of relative width edge."""
        r2 = ((x - f32(cx)) / f32(rx)) ** 2 + ((y - f32(cy)) / f32(ry)) ** 2
        return np.clip((f32(1.0) - r2) * f32(1.0 / edge), 0.0, 1.0)

    img = blob(0.03 * j[0], 0.4, 0.98 + 0.04 * j[1], 1.35, 0.3) * f32(0.45)  # thorax
    lung_w, lung_h, lung_y = 0.27 + 0.02 * j[2], 0.58 + 0.05 * j[3], -0.1 + 0.04 * j[4]
    img -= blob(-0.36, lung_y, lung_w, lung_h, 0.5) * f32(0.2)
    img -= blob(0.36 + 0.02 * j[5], lung_y + 0.03, lung_w * 0.95, lung_h * 0.95, 0.5) * f32(0.2)
    spine = np.exp(-(((x - f32(0.02 * j[6])) / f32(0.1)) ** 2))  # mediastinum/spine band
    img += spine * np.clip(y + f32(0.85), 0.0, 0.35) * f32(0.95)
    img += blob(0.12 + 0.03 * j[7], 0.3, 0.32, 0.25, 2.0) * f32(0.22)  # heart shadow
    img += f32(0.05) + f32(0.06) * y  # baseline, brighter towards the abdomen
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    noise = rng.standard_normal(half_h * half_w, dtype=f32).reshape(half_h, half_w)
    img += (noise * f32(0.006)).repeat(2, axis=0)[:height].repeat(2, axis=1)[:, :width]
    top = float(2**bits - 1)
    out = np.clip(img, 0.0, 1.0) * f32(top) + f32(0.5)
    return out.astype(np.uint8 if bits <= 8 else np.uint16)


def write_text(path: Path, lines: Sequence[str]) -> None:
    """Write lines with '\\n' endings (as the real files have), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")


def save_image(path: Path, pixels: np.ndarray) -> None:
    """Save a uint8 array (HxW or HxWx3) as PNG or JPEG with fixed, timestamp-free options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="JPEG", quality=90)
