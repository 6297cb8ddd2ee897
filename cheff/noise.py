"""Per-image noise streams: what makes a sample depend on its seed and number only.

Image ``i`` of a run draws its starting noise and every step noise from its own CPU
``torch.Generator`` seeded :func:`image_seed` ``(seed, i)``, so the same seed gives the same
noise on any device and for any batch size. The super-resolution stage of the same image uses
the stream ``"sr"``, independent of the latent diffusion stage.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_seed(seed: Any) -> int:
    """``seed`` as a plain int. Every image's generator is seeded from the run's seed and the
    image's number (:func:`cheff.noise.image_seed`), so a seed must be an integer: anything else
    (a ``torch.Generator``, a float) would fail deep inside, or seed from its ``repr``."""
    if isinstance(seed, bool):
        raise TypeError(f"seed: an int, not a bool ({seed})")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(
            f"seed: an int, not {type(seed).__name__} (image i draws its noise from its own "
            "generator, seeded with cheff.noise.image_seed(seed, i); a run takes no generator)"
        ) from None


def image_seed(seed: int, index: int, stream: str = "") -> int:
    """The generator seed of image ``index`` of a run with ``seed``: a 63-bit hash of both.

    Hashing (rather than ``seed + index``) keeps the streams of neighbouring seeds apart: run
    seed 1 does not repeat images 1, 2, ... of run seed 0. ``stream`` names another stage of
    the same image (``"sr"``: the super-resolution noise), independent of the first.
    """
    key = f"cheff:{int(seed)}:{int(index)}" if not stream else f"cheff:{stream}:{seed}:{index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageNoise(Sequence[Tensor]):
    """Step noises for a batch, each image's part drawn from that image's generator.

    Every access draws fresh noise (the samplers read entry k once, at step k, in order), so
    image i's stream is the same whatever batch it sits in.
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        shape: tuple[int, ...],
        length: int,
        device: torch.device,
    ) -> None:
        self._generators = generators
        self._shape = shape
        self._length = length
        self._device = device

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):  # type: ignore[override]
        if not 0 <= index < self._length:
            raise IndexError(index)
        return draw(self._generators, self._shape, self._device)


def draw(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One (len(generators), *shape) draw, a row per image, made on the CPU, moved to device."""
    rows = [torch.randn((1, *shape), generator=g) for g in generators]
    return torch.cat(rows).to(device)


def generators(seed: int, indices: range, stream: str = "") -> list[torch.Generator]:
    """One CPU generator per image number in ``indices``, seeded :func:`image_seed`."""
    return [torch.Generator().manual_seed(image_seed(seed, i, stream)) for i in indices]
