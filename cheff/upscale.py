"""Super-resolution for users: 256 px grey images -> 1024 px, as the official SR wrapper.

::

    from cheff.upscale import Upscaler
    up = Upscaler.from_checkpoint("cheff_sr_fine.pt")      # cuda if available
    high = up(low, seed=0)                                  # (B, 1, 1024, 1024) in [0, 1]

The official ``sample(img, method="ddim", sampling_steps=100, eta=0.0)``: condition =
bicubic(2 low - 1) without antialias, x_T ~ N(0, 1), DDIM over the cosine schedule's steps
(0, T // S, ...) with no shift and no x0 clipping, then clamp(-1, 1) and (x + 1) / 2. The
paper samples with 150 steps (:data:`DEFAULT_SR_STEPS`); ``sampler="ddpm"`` runs all 2000
ancestral steps with x0 clipped (the tutorial's choice). Image ``i`` draws its noise from the
``"sr"`` stream of :func:`cheff.noise.image_seed` ``(seed, i)``, so results do not depend on
the batch size and a cascade's two stages have independent noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cheff.devices import resolve_device
from cheff.diffusion import NoiseSchedule, ddim, ddpm
from cheff.diffusion.schedules import check_eta
from cheff.models.sr import LR_SIZE, SR_SIZE, SuperResolution, check_unit_images, sr_condition
from cheff.noise import ImageNoise, check_seed, draw, generators

log = logging.getLogger(__name__)

DEFAULT_SR_STEPS = 150  # the paper's cascade
OFFICIAL_SR_ETA = 0.0  # the official SR wrapper's default
SR_STREAM = "sr"


class Upscaler:
    """A loaded SR model ready to sample: device, precision, schedule, output size, and the
    input side it was trained from (``low_size``; None: not known, not checked)."""

    def __init__(
        self,
        sr: SuperResolution,
        *,
        size: int = SR_SIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        schedule: NoiseSchedule | None = None,
        low_size: int | None = None,
    ) -> None:
        factor = sr.unet.config.downsampling
        if size % factor:
            raise ValueError(f"size {size} must be a multiple of the SR U-Net's factor {factor}")
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype}: choose torch.float32 or torch.bfloat16 (autocast)")
        self.device = resolve_device(device)
        self.dtype = dtype or torch.float32
        self.sr = sr.to(self.device).eval()
        self.size = size
        self.low_size = low_size
        if schedule is None:  # the one the model was trained with (its file's), else the paper's
            schedule = sr.schedule if sr.schedule is not None else NoiseSchedule.sr_cosine()
        self.schedule = schedule
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)  # official buffers
        self.last_run: dict[str, Any] | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Upscaler:
        """``size`` defaults to the side the file was trained at, ``low_size`` to the side it
        was trained from: our trained files record both; the released ones are 256 -> 1024 px
        models (at another ``size`` their input side is not assumed)."""
        from cheff.checkpoints import load_sr, read_checkpoint

        checkpoint = read_checkpoint(path)  # a missing or wrong file: a CheckpointError
        sr = load_sr(checkpoint)
        ours = checkpoint.container == "cheff"
        recorded = checkpoint.metadata if ours else {}  # our header: the sides trained at
        size = size or int(recorded.get("image_size", 0)) or SR_SIZE
        if ours:
            low_size = int(recorded["low_size"]) if "low_size" in recorded else None
        else:
            low_size = LR_SIZE if size == SR_SIZE else None
        return cls(sr, size=size, device=device, dtype=dtype, low_size=low_size)

    def check_options(self, steps: int, eta: float, sampler: str = "ddim") -> Tensor | None:
        """The DDIM timesteps of ``steps`` (None for ddpm), once ``steps``, ``eta`` and
        ``sampler`` are known to be usable: the cascade checks them before its LDM stage."""
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"SR sampler {sampler!r}: choose ddim or ddpm")
        if sampler == "ddpm":
            return None
        check_eta(eta, "sr_eta")
        return self.schedule.ddim_timesteps(steps)

    def __call__(
        self,
        low: Tensor,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int = DEFAULT_SR_STEPS,
        eta: float = OFFICIAL_SR_ETA,
        sampler: str = "ddim",
        batch_size: int = 4,
        progress: bool = True,
        on_batch: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor | None:
        """Grey images (B, 1, h, h) in [0, 1] -> (B, 1, size, size) in [0, 1], on the CPU.

        Image ``k`` of ``low`` is image number ``start + k`` of the run (its noise stream).
        ``on_batch(k, images)`` takes each finished batch (``k``: its first row) as it comes,
        and then nothing is kept or returned (:attr:`last_run` is set before the first).

        ``low`` must be floating point in [0, 1] (1e-3 of slack for resampling overshoot),
        square (the model upsamples to a square, so other images would be stretched) and, when
        :attr:`low_size` is known, of that side (the condition would resize any side without a
        word, into images unlike those the model learnt from).
        """
        from tqdm.auto import tqdm

        if not isinstance(low, Tensor):
            raise TypeError(f"low: a tensor (B, 1, h, h), not {type(low).__name__}")
        if low.ndim != 4 or low.shape[1] != 1:
            raise ValueError(f"expected grey images (B, 1, H, W), got {tuple(low.shape)}")
        height, width = low.shape[-2:]
        if height != width:
            raise ValueError(
                f"low: images must be square, got {height}x{width}: the SR model makes "
                f"{self.size}x{self.size} and would stretch them; crop to the centre square "
                "first (`cheff upscale` does that for image files)"
            )
        if self.low_size is not None and height != self.low_size:
            raise ValueError(
                f"low: {height} px images, but this SR model was trained to upscale "
                f"{self.low_size} px ones: resize them first (machex.resize, or "
                "cheff.pipeline.load_image for files)"
            )
        check_unit_images(low, "low")
        seed = check_seed(seed)
        if batch_size < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1 and start >= 0, got {batch_size}, {start}")
        timesteps = self.check_options(steps, eta, sampler)
        calls = len(timesteps) if timesteps is not None else self.schedule.num_timesteps
        shape = (1, self.size, self.size)
        count = low.shape[0]
        self.last_run = {
            "sr_sampler": sampler,
            "sr_steps": steps if sampler == "ddim" else calls,
            "sr_network_calls": calls,
            "sr_eta": float(eta) if sampler == "ddim" else None,
            "sr_size": self.size,
            "sr_schedule": self.schedule.summary(),
            "sr_seed_rule": "image i: CPU torch.Generator seeded "
            "cheff.noise.image_seed(seed, i, 'sr')",
        }
        began, outputs = time.perf_counter(), []
        batches = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
        with tqdm(total=calls * len(batches), disable=not progress, unit="step", desc="sr") as bar:
            for rows in batches:
                condition = sr_condition(low[rows.start : rows.stop].to(self.device), self.size)
                numbers = range(start + rows.start, start + rows.stop)
                streams = generators(seed, numbers, SR_STREAM)
                x_T = draw(streams, shape, self.device)

                def eps(x: Tensor, t: Tensor, condition: Tensor = condition) -> Tensor:
                    bar.update(1)
                    with torch.autocast(
                        self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
                    ):
                        return self.sr.eps(x, t, condition).float()

                with torch.no_grad():
                    if timesteps is not None:
                        noises = ImageNoise(streams, shape, len(timesteps), self.device)
                        raw = ddim(eps, x_T, self.alphas_cumprod, timesteps, eta, noises=noises)
                    else:
                        noises = ImageNoise(streams, shape, calls, self.device)
                        raw = ddpm(eps, x_T, self.schedule.to(torch.float32), noises=noises)
                images = ((raw.clamp(-1, 1) + 1) / 2).float().cpu()
                if on_batch is not None:
                    on_batch(rows.start, images)
                else:
                    outputs.append(images)
        seconds = time.perf_counter() - began
        self.last_run["sr_seconds"] = round(seconds, 3)
        log.info(
            "sr: %d images to %d px, %d network calls each, %.1f s",
            count,
            self.size,
            calls,
            seconds,
        )
        return None if on_batch is not None else torch.cat(outputs)
