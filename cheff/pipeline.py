"""Sampling and in-painting with a loaded Cheff LDM: from checkpoints to PNG files.

::

    from cheff.pipeline import Pipeline, save_images, save_grid
    pipe = Pipeline.from_checkpoints("cheff_diff_uncond.pt")       # cuda if available
    images = pipe(16, seed=0)                                       # (16, 1, 256, 256) in [0, 1]
    save_images(images, "out/"); save_grid(images, "out/grid.png")
    print(pipe.last_run)                                            # sampler, calls, seconds, ...

Reproducibility does not hang on torch's global RNG or on the batch size: image ``i`` of a run
draws its x_T and every step noise from its own CPU ``torch.Generator`` seeded with
:func:`image_seed` ``(seed, i)``, so the same ``seed`` gives the same noise on any device and
for any ``batch_size``; images then differ only by the network's floating point (device,
kernel choice, bf16). The official global-RNG draw order is reproduced by the lower-level
samplers in :mod:`cheff.diffusion` instead (``tests/test_cheff_ldm_sampling.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cheff.conditioning import Conditioner, ConditionError, Labels, is_label_vector
from cheff.devices import resolve_device
from cheff.diffusion import (
    EpsFn,
    Inpaint,
    NoiseSchedule,
    StepHook,
    classifier_free,
    ddim,
    ddpm,
    dpmpp_2m,
    solver_timesteps,
)
from cheff.diffusion import paste_back as paste_known
from cheff.diffusion.schedules import check_eta
from cheff.glue import official_glue
from cheff.models.sr import check_unit_images
from cheff.noise import ImageNoise as _ImageNoise
from cheff.noise import check_seed, image_seed
from cheff.noise import draw as _draw
from cheff.noise import generators as _generators
from cheff.upscale import DEFAULT_SR_STEPS, OFFICIAL_SR_ETA, Upscaler

if TYPE_CHECKING:
    from cheff.models.ldm import LatentDiffusion
    from cheff.models.unet import UNetConfig

__all__ = [
    "DEFAULT_STEPS",
    "SAMPLER_NAMES",
    "Pipeline",
    "Samples",
    "image_seed",
    "inpaint_latents",
    "latent_mask",
    "load_image",
    "load_mask",
    "save_grid",
    "save_images",
    "to_grey",
]

log = logging.getLogger(__name__)

# Sampler names the pipeline takes ("dpm" is short for "dpmpp_2m") and their default steps:
# DDIM 100 as the official wrappers, DDPM all T steps, DPM-Solver++(2M) 20 network calls.
SAMPLER_ALIASES = {"ddim": "ddim", "ddpm": "ddpm", "dpm": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}
SAMPLER_NAMES = tuple(SAMPLER_ALIASES)
DEFAULT_STEPS = {"ddim": 100, "ddpm": None, "dpmpp_2m": 20}  # None: the schedule's T
OFFICIAL_ETA = 1.0  # both official LDM wrappers and the tutorial
DTYPES = (torch.float32, torch.bfloat16)


RELEASED_IMAGE_SIZE = 256  # the side the released LDMs sample at


class Samples(NamedTuple):
    """Images (N, 1, H, W) in [0, 1] and the latents they were decoded from, on the CPU; with
    super-resolution, ``images`` are the 1024 px ones and ``low_res`` the 256 px ones the SR
    model was conditioned on (the official glue of the decoder output)."""

    images: Tensor
    latents: Tensor
    low_res: Tensor | None = None


#: ``on_batch(offset, samples)``: a finished batch, its first image's offset within the run.
OnBatch = Callable[[int, Samples], None]


class _CountedEps:
    """The network call seen by a sampler: counts calls, runs the U-Net (and guidance) under
    bf16 autocast when asked and hands fp32 back, so the sampler arithmetic stays in fp32."""

    def __init__(self, eps: EpsFn, autocast: torch.dtype | None, bar: Any) -> None:
        self.eps, self.autocast, self.bar, self.calls = eps, autocast, bar, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.autocast is None:
            return self.eps(x, t)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return self.eps(x, t).float()


def to_grey(decoded: Tensor) -> Tensor:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, 1, H, W) in [0, 1].

    clamp(-1, 1), (x + 1) / 2, then the mean of the 3 channels (the autoencoder was trained on
    grey images replicated to RGB, so the channels nearly agree). The official tutorial
    instead truncates to 8 bit and converts with PIL's ITU-R 601 luma (0.299 R + 0.587 G +
    0.114 B); that differs from the mean by the small channel disagreement plus up to 1/255.
    """
    return ((decoded.clamp(-1, 1) + 1) / 2).mean(1, keepdim=True)


@torch.no_grad()
def inpaint_latents(
    eps_fn: EpsFn,
    known_latent: Tensor,
    mask: Tensor,
    x_T: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    eta: float = OFFICIAL_ETA,
    *,
    noises: Sequence[Tensor] | Tensor | None = None,
    q_noises: Sequence[Tensor] | Tensor | None = None,
    generator: torch.Generator | None = None,
    paste_back: bool = False,
    on_step: StepHook | None = None,
) -> Tensor:
    """The official DDIM in-painting (``sample_inpaint``) on latents, plus optional paste-back.

    ``mask`` is at latent resolution, 1 = keep. Each step first re-noises ``known_latent`` to
    the step's level and blends it in where the mask is 1 (``q_noises`` or ``generator`` give
    that noise), then takes a DDIM step (``noises`` or ``generator``). With ``paste_back=False``
    this is the official output, whose kept region is only near the known latent; with True the
    kept region of the result is ``known_latent`` exactly (for a 0/1 mask).
    """
    inpaint = Inpaint(known_latent, mask, q_noises)
    z = ddim(
        eps_fn,
        x_T,
        alphas_cumprod,
        timesteps,
        eta,
        noises=noises,
        generator=generator,
        inpaint=inpaint,
        on_step=on_step,
    )
    return paste_known(z, known_latent, mask) if paste_back else z


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """An image-space keep mask (B, 1, H, W), 1 = keep, on the latent grid (B, 1, h, w).

    Pixels are kept where the mask is >= 0.5; a latent cell is kept only when all of its
    (H/h x W/w) pixels are, so the region to generate grows to whole cells and no pixel marked
    for generation stays pinned to the input. A mask already at ``latent_size`` (as the official
    fixtures give it) is used as it is.
    """
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected (B, 1, H, W) or (H, W), got {tuple(mask.shape)}")
    h, w = latent_size
    height, width = mask.shape[-2:]
    if (height, width) == (h, w):  # used as it is: a 0/255 mask would blend 255x the latent
        mask = mask.float()
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError(
                f"mask at the latent resolution {h}x{w}: values in [0, 1] (1 = keep), got "
                f"[{mask.min().item():g}, {mask.max().item():g}]"
            )
        return mask
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"mask {height}x{width} is neither at the latent resolution {h}x{w} nor an integer "
            f"multiple of it"
        )
    keep = (mask >= 0.5).float()
    return -F.max_pool2d(-keep, height // h)  # min over each cell: 1 only if all pixels kept


class Pipeline:
    """A Cheff LDM ready to sample: device, U-Net precision, schedule, image size, conditions.

    ``dtype`` None or float32 runs everything in fp32; bfloat16 runs the U-Net under autocast
    (meant for CUDA; it works on the CPU too) while the sampler and the decoder stay in
    fp32. ``image_size`` is the output side (256 for the released models; the latent side is
    it divided by the autoencoder's factor). After every run :attr:`last_run` describes it.

    A conditioned LDM (``ldm.condition``: ``"report"`` or ``"labels"``) samples under
    ``prompt=`` or ``labels=`` (one for all images, or one per image), with classifier-free
    ``guidance_scale`` (1 = plain conditional sampling). ``conditioner`` turns them into
    token ids: a report model needs one built from its vocabulary
    (:meth:`from_checkpoints` finds it in our files or takes ``vocab=``).
    """

    def __init__(
        self,
        ldm: LatentDiffusion,
        *,
        image_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        schedule: NoiseSchedule | None = None,
        conditioner: Conditioner | None = None,
        upscaler: Upscaler | None = None,
    ) -> None:
        if ldm.autoencoder is None:
            raise ValueError(
                "this LDM has no autoencoder to decode with: load it from a file holding one "
                "or pass ae= (Pipeline.from_checkpoints(sdm, ae=...))"
            )
        if ldm.condition is None and conditioner is not None:
            raise ValueError("an unconditional LDM takes no conditioner")
        if ldm.condition == "labels" and conditioner is None:
            conditioner = Conditioner.create("labels")
        if ldm.condition is not None:
            if conditioner is None:
                raise ValueError(
                    "a report model needs its tokenizer: Pipeline(..., conditioner="
                    "Conditioner.create('report', VOCAB)) or from_checkpoints(..., vocab=VOCAB)"
                )
            if conditioner.kind != ldm.condition:
                raise ValueError(f"a {conditioner.kind} conditioner for a {ldm.condition} model")
        self.conditioner = conditioner
        self.upscaler = upscaler
        # Files the models came from ({"sdm": path, ...}), hashed into every image's provenance.
        self.checkpoints: dict[str, Path | None] = {}
        self._hashes: dict[str, str] | None = None
        self._conditions_of_last_run: list[Any] | None = None
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype}: choose torch.float32 or torch.bfloat16 (autocast)")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.ldm = ldm.to(self.device).eval()
        if schedule is None:  # the one the model was trained with (its file's), else the paper's
            schedule = ldm.schedule if ldm.schedule is not None else NoiseSchedule.ldm()
        self.schedule = schedule
        # The official tables index the float32 checkpoint buffer (FORMAT.md 3c).
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        factor = ldm.autoencoder.config.downsampling
        unet_factor = ldm.unet.config.downsampling
        if image_size % (factor * unet_factor):
            raise ValueError(
                f"image_size {image_size} must be a multiple of {factor * unet_factor} (the "
                f"autoencoder's factor {factor} times the U-Net's {unet_factor})"
            )
        self.image_size = image_size
        self.latent_shape = (
            ldm.unet.config.in_channels,
            image_size // factor,
            image_size // factor,
        )
        self.last_run: dict[str, Any] | None = None

    @classmethod
    def from_checkpoints(
        cls,
        sdm: str | Path,
        ae: str | Path | None = None,
        sr: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_ema: bool = False,
        unet_config: UNetConfig | None = None,
        image_size: int | None = None,
        vocab: str | Path | None = None,
        num_head_channels: int | None = None,
        num_heads: int | None = None,
    ) -> Pipeline:
        """Load the LDM (``sdm``) with :func:`cheff.checkpoints.load_ldm`; ``ae`` replaces the
        file's own autoencoder. ``device`` defaults to cuda when available.

        An official file does not store its attention head split and the shapes cannot tell
        it: ``num_head_channels`` (unconditional model) or ``num_heads`` (report model) give
        it, else 32-channel heads / 8 heads (the released models') are assumed, and a file
        with another split would sample wrong images without an error. ``unet_config``
        replaces the whole architecture instead. Our files store the split (an error if given).

        A report model's tokenizer: ``vocab`` (a ``vocab.txt``, a folder holding one, or a
        hub name in the local cache; the released model needs bert-base-uncased's) when
        given, else the vocabulary our training wrote into the file. ``image_size`` None: the
        side our trained file says it was trained at, else 256 (the released models')."""
        from cheff.checkpoints import load_ldm, read_image_size, read_vocab

        device = resolve_device(device)
        ldm = load_ldm(
            sdm,
            ae,
            use_ema=use_ema,
            config=unet_config,
            device=device,
            num_head_channels=num_head_channels,
            num_heads=num_heads,
        )
        if image_size is None:
            image_size = read_image_size(sdm) or RELEASED_IMAGE_SIZE
        conditioner = None
        if ldm.condition == "report":
            length = ldm.text_encoder.config.max_seq_len  # type: ignore[union-attr]
            stored = None if vocab is not None else read_vocab(sdm)
            if stored is not None:
                from cheff.text import ReportTokenizer

                tokenizer = ReportTokenizer.from_vocab_text(stored, length, f"{sdm} (vocab)")
                conditioner = Conditioner("report", tokenizer)
            else:
                try:
                    conditioner = Conditioner.create(
                        "report", None if vocab is None else str(vocab), max_length=length
                    )
                except FileNotFoundError as error:
                    where = "" if vocab is not None else f"{sdm} carries no vocabulary, and "
                    raise ValueError(f"{where}{error}") from None
        upscaler = None
        if sr is not None:
            upscaler = Upscaler.from_checkpoint(sr, device=device, dtype=dtype)
            low_size = upscaler.low_size  # our SR files record it; the released take 256
            if low_size is not None and low_size != image_size:
                raise ValueError(
                    f"{sr} was trained to upscale {low_size} px images, but {sdm} samples at "
                    f"{image_size} px: give image_size={low_size} (--image-size) or another SR"
                )
        pipe = cls(
            ldm,
            image_size=image_size,
            device=device,
            dtype=dtype,
            conditioner=conditioner,
            upscaler=upscaler,
        )
        pipe.checkpoints = {
            "sdm": Path(sdm),
            "ae": None if ae is None else Path(ae),
            "sr": None if sr is None else Path(sr),
        }
        return pipe

    def image_text(self, offsets: range | None = None) -> list[dict[str, str]]:
        """Provenance text chunks (:mod:`cheff.provenance`) for each image of the last (or
        the running) run, or for those at ``offsets`` within it: synthetic, checkpoint
        SHA-256s, seed and image number, condition, sampler settings."""
        from cheff.provenance import checkpoint_hashes, image_text

        if self.last_run is None:
            raise RuntimeError("no run yet: sample first")
        if self._hashes is None:
            self._hashes = checkpoint_hashes(self.checkpoints)
        run, items = self.last_run, self._conditions_of_last_run
        start = int(run.get("start", 0))
        offsets = range(int(run["n"])) if offsets is None else offsets
        return [
            image_text(run, start + k, None if items is None else items[k], self._hashes)
            for k in offsets
        ]

    # ------------------------------------------------------------------------- sampling

    def __call__(
        self,
        n: int,
        *,
        seed: int = 0,
        steps: int | None = None,
        sampler: str = "ddim",
        eta: float = OFFICIAL_ETA,
        exact_steps: bool = False,
        batch_size: int = 16,
        progress: bool = True,
        return_latents: bool = False,
        start: int = 0,
        prompt: str | Sequence[str] | None = None,
        labels: Labels | Sequence[Labels] | None = None,
        guidance_scale: float = 1.0,
        sr_steps: int = DEFAULT_SR_STEPS,
        sr_eta: float = OFFICIAL_SR_ETA,
        on_batch: OnBatch | None = None,
    ) -> Tensor | Samples | None:
        """``n`` images (n, 1, H, W) in [0, 1], on the CPU; with ``return_latents`` a
        :class:`Samples` of images and latents. With ``on_batch``, each finished batch goes
        there as a :class:`Samples` (with the offset of its first image) and nothing is
        returned: a long run then holds one batch in memory, and its files can be written as
        they come. With an upscaler (``sr=``) the images are
        1024 px: the cascade's SR stage runs DDIM with ``sr_steps`` (150, as the paper) and
        ``sr_eta`` (0, the official default) on the official glue of the 256 px samples.

        A report model takes ``prompt`` (one text for all, or n texts), a label model
        ``labels`` (one image's labels for all, or n of them: a ``{"Cardiomegaly": 1}``
        mapping, a ``"Cardiomegaly=1,Edema=0"`` string, or a (14,) vector with NaN for not
        mentioned); ``guidance_scale`` w gives eps(null) + w (eps(c) - eps(null)).

        ``steps`` None takes the sampler's default (:data:`DEFAULT_STEPS`). DDIM follows the
        official step rule: every (T // steps)-th step, so 150 asked gives 167 network calls;
        ``exact_steps`` gives exactly ``steps``. DDPM runs all T steps (no x0 clipping: latents
        are not in [-1, 1]); "dpm" (DPM-Solver++(2M)) makes ``steps`` calls and ignores ``eta``.
        ``start`` numbers the images from there (image i uses :func:`image_seed` (seed, i)),
        so a run can be split into parts that together equal the whole.
        """
        if n < 1 or batch_size < 1 or start < 0:
            raise ValueError(
                f"need n >= 1, batch_size >= 1, start >= 0 (got {n}, {batch_size}, {start})"
            )
        seed = check_seed(seed)
        name = _sampler_name(sampler)
        steps = self._steps(name, steps)
        conditions = self._conditions(n, prompt, labels, guidance_scale)
        timesteps = self._ddim_timesteps(steps, exact_steps) if name == "ddim" else None
        calls = self._expected_calls(name, steps, timesteps)
        eta = check_eta(eta) if name == "ddim" else eta  # the others take no eta
        self._check_sr_options(sr_steps, sr_eta)

        def run(model_eps: EpsFn, indices: range) -> Tensor:
            generators = _generators(seed, indices)
            x_T = _draw(generators, self.latent_shape, self.device)
            if name == "ddim":
                noises = _ImageNoise(generators, self.latent_shape, len(timesteps), self.device)
                return ddim(model_eps, x_T, self.alphas_cumprod, timesteps, eta, noises=noises)
            if name == "ddpm":
                noises = _ImageNoise(generators, self.latent_shape, steps, self.device)
                return ddpm(model_eps, x_T, self.schedule, noises=noises, clip_x0=False)
            return dpmpp_2m(model_eps, x_T, self.schedule.alphas_cumprod, steps)

        info = {
            "task": "sample",
            "sampler": name,
            "steps": steps,
            "exact_steps": bool(exact_steps) if name == "ddim" else None,
            "eta": float(eta) if name == "ddim" else None,
        }
        sr_options = {"steps": sr_steps, "eta": sr_eta}
        return self._run(
            run,
            n,
            start,
            seed,
            batch_size,
            calls,
            progress,
            return_latents,
            info,
            conditions,
            sr_options,
            on_batch,
        )

    def inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        *,
        seed: int = 0,
        steps: int = 100,
        eta: float = OFFICIAL_ETA,
        paste_back: bool = True,
        exact_steps: bool = False,
        batch_size: int = 16,
        progress: bool = True,
        return_latents: bool = False,
        scaled_known: bool = False,
        prompt: str | Sequence[str] | None = None,
        labels: Labels | Sequence[Labels] | None = None,
        guidance_scale: float = 1.0,
        sr_steps: int = DEFAULT_SR_STEPS,
        sr_eta: float = OFFICIAL_SR_ETA,
        on_batch: OnBatch | None = None,
    ) -> Tensor | Samples | None:
        """In-/out-paint ``image`` (B, 1 or 3, H, W) in [0, 1] where ``mask`` is 0; 1 = keep.
        A conditioned model takes ``prompt`` / ``labels`` and ``guidance_scale``, and
        ``on_batch`` streams the results, as :meth:`__call__` does.

        ``mask``: (B or 1, 1, H, W) in image space (put on the latent grid by
        :func:`latent_mask`) or already at latent resolution. The known latent is the
        autoencoder's posterior mean *without* the scale factor, as the official code does for
        both models (``scaled_known=True`` multiplies it in; the same for the unconditional
        model, whose scale factor is 1). DDIM with the official per-step blend; then with
        ``paste_back`` (default) the kept latent cells of the result are the input's latent
        (in the model's scale, whatever ``scaled_known``) exactly, before decoding, so the
        kept region decodes to the autoencoder's reconstruction of the input.
        ``paste_back=False`` gives the official output.
        """
        seed = check_seed(seed)
        x = _as_batch(image, "image")
        check_unit_images(x, "image")  # x * 2 - 1 of a 0-255 image would run, far off
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"image: 1 or 3 channels, got {x.shape[1]}")
        factor = self.ldm.autoencoder.config.downsampling
        unet_factor = self.ldm.unet.config.downsampling
        height, width = x.shape[-2:]
        if height % (factor * unet_factor) or width % (factor * unet_factor):
            raise ValueError(
                f"image {height}x{width}: sides must be multiples of {factor * unet_factor}"
            )
        if self.upscaler is not None and height != width:
            raise ValueError(
                f"image {height}x{width}: the cascade's super-resolution stage takes square "
                "images only; crop to the centre square (load_image does)"
            )
        low_size = None if self.upscaler is None else self.upscaler.low_size
        if low_size is not None and height != low_size:
            raise ValueError(
                f"image {height}x{width}: the cascade's super-resolution model upscales "
                f"{low_size} px images; resize to {low_size} first (load_image(path, "
                f"{low_size}) does)"
            )
        shape = (self.latent_shape[0], height // factor, width // factor)
        keep = latent_mask(_as_batch(mask, "mask"), shape[1:]).to(self.device)
        if keep.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mask batch {keep.shape[0]} for {x.shape[0]} images")
        keep = keep.expand(x.shape[0], -1, -1, -1)
        if self.ldm.scale_factor != 1.0 and not scaled_known:
            log.warning(
                "in-painting with the official unscaled known latent in the per-step blend on "
                "a model with scale_factor %s (official quirk); scaled_known=True "
                "(--scaled-known) blends the latent in the model's scale",
                self.ldm.scale_factor,
            )
        timesteps = self._ddim_timesteps(steps, exact_steps)
        eta = check_eta(eta)
        self._check_sr_options(sr_steps, sr_eta)
        conditions = self._conditions(x.shape[0], prompt, labels, guidance_scale)

        def run(model_eps: EpsFn, indices: range) -> Tensor:  # image numbers = rows here
            rows = slice(indices.start, indices.stop)
            with torch.no_grad():
                known = self.ldm.encode_images(x[rows] * 2 - 1, scaled=scaled_known)
            generators = _generators(seed, indices)
            x_T = _draw(generators, shape, self.device)
            q_noises = _ImageNoise(generators, shape, len(timesteps), self.device)
            noises = _ImageNoise(generators, shape, len(timesteps), self.device)
            z = inpaint_latents(
                model_eps,
                known,
                keep[rows],
                x_T,
                timesteps,
                self.alphas_cumprod,
                eta,
                noises=noises,
                q_noises=q_noises,
            )
            if not paste_back:
                return z
            # Pasted in the model's scale, whatever the blend used: the decoder divides by it.
            scaled = known if scaled_known else known * self.ldm.scale_factor
            return paste_known(z, scaled, keep[rows])

        info = {
            "task": "inpaint",
            "sampler": "ddim",
            "steps": steps,
            "exact_steps": bool(exact_steps),
            "eta": float(eta),
            "paste_back": bool(paste_back),
            "scaled_known": bool(scaled_known),
            "kept_fraction": float(keep.mean()),
            "image_size": width,  # any multiple of the factors, not only the pipeline's
        }
        n = x.shape[0]
        return self._run(
            run,
            n,
            0,
            seed,
            batch_size,
            len(timesteps),
            progress,
            return_latents,
            info,
            conditions,
            {"steps": sr_steps, "eta": sr_eta},
            on_batch,
        )

    # ------------------------------------------------------------------------- internals

    def _conditions(
        self, n: int, prompt: Any, labels: Any, guidance_scale: float
    ) -> _Conditions | None:
        """The n images' conditions, checked against the model, or None (unconditional)."""
        kind = self.ldm.condition
        self._conditions_of_last_run = None
        given = "prompt" if prompt is not None else "labels" if labels is not None else None
        if prompt is not None and labels is not None:
            raise ValueError("give prompt= or labels=, not both")
        if kind is None:
            if given is not None or guidance_scale != 1.0:
                raise ValueError(
                    f"this LDM is unconditional: it takes no {given or 'guidance_scale'}"
                )
            return None
        wanted = "prompt" if kind == "report" else "labels"
        if given != wanted:
            raise ValueError(
                f"a {kind} model is conditioned on {wanted} (prompt= / --prompt: a report "
                "text; labels= / --labels: findings), one for all images or one per image"
                + (f"; {given} given" if given else "")
                + ("; an empty prompt is the null condition" if kind == "report" else "")
            )
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        value = prompt if kind == "report" else labels
        items = _per_image(value, n, wanted)
        self._conditions_of_last_run = items
        assert self.conditioner is not None
        ids = self.conditioner.ids(items)  # fails here, before sampling, on a bad condition
        return _Conditions(ids, self.conditioner.null_ids(1), float(guidance_scale))

    def _eps_fn(self, conditions: _Conditions | None, rows: slice) -> EpsFn:
        """The network as the sampler sees it for the images ``rows`` (guided if asked)."""
        if conditions is None:
            return self.ldm.eps
        context = self.ldm.context(conditions.ids[rows].to(self.device))
        if conditions.scale != 1.0:
            null = self.ldm.context(conditions.null_ids.to(self.device))
            return classifier_free(self.ldm.eps, context, null, conditions.scale)
        return lambda x, t: self.ldm.eps(x, t, context)

    def _steps(self, name: str, steps: int | None) -> int:
        total = self.schedule.num_timesteps
        if name == "ddpm":
            if steps not in (None, total):
                raise ValueError(
                    f"ddpm runs all {total} steps, not {steps}: leave steps out, or use ddim "
                    "(eta 1.0 is its ancestral-like setting) or dpm for fewer"
                )
            return total
        steps = DEFAULT_STEPS[name] if steps is None else int(steps)
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be in [1, {total}], got {steps}")
        return steps

    def _check_sr_options(self, steps: int, eta: float) -> None:
        """The cascade's SR options, checked before the LDM stage (not after its first batch)."""
        if self.upscaler is not None:
            self.upscaler.check_options(steps, eta)

    def _ddim_timesteps(self, steps: int, exact: bool) -> Tensor:
        try:
            return self.schedule.ddim_timesteps(steps, exact)
        except ValueError as error:
            if "past T - 1" not in str(error):
                raise
            raise ValueError(
                f"DDIM with {steps} steps: {error}. The official rule (every (T // steps)-th "
                "step, shifted by 1) cannot run this count (the official code fails on it too, "
                "e.g. 3, 101-111 or over 500 steps); pick another count or exact_steps=True"
            ) from None

    def _expected_calls(self, name: str, steps: int, timesteps: Tensor | None) -> int:
        if timesteps is not None:
            return len(timesteps)
        if name == "dpmpp_2m":  # log-SNR rounding may merge points
            return len(solver_timesteps(self.schedule.alphas_cumprod, steps))
        return steps

    def _run(
        self,
        run,
        n: int,
        start: int,
        seed: int,
        batch_size: int,
        calls: int,
        progress: bool,
        return_latents: bool,
        info: dict[str, Any],
        conditions: _Conditions | None = None,
        sr_options: dict[str, Any] | None = None,
        on_batch: OnBatch | None = None,
    ) -> Tensor | Samples | None:
        """Sample batch by batch. Each finished batch (with its SR stage, in a cascade) goes
        to ``on_batch(offset, samples)`` at once, so a long run's finished images can be
        written before the next batch starts; with ``on_batch`` nothing is kept (a run of
        12,500 images at 1024 px would hold 52 GB) and the result is None."""
        from tqdm.auto import tqdm

        batches = [
            range(first, min(first + batch_size, start + n))
            for first in range(start, start + n, batch_size)
        ]
        autocast = self.dtype if self.dtype != torch.float32 else None
        # The SR model was trained on the official glue's 8-bit luma; plain output keeps the
        # decoder's precision (the channel mean).
        grey = official_glue if self.upscaler is not None else to_grey
        # Described before the first batch: the provenance written with each batch reads it.
        self.last_run = {
            **info,
            "network_calls": calls,
            "n": n,
            "start": start,
            "seed": seed,
            "seed_rule": "image i: CPU torch.Generator seeded cheff.pipeline.image_seed(seed, i)",
            "batch_size": batch_size,
            "image_size": info.get("image_size", self.image_size),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "condition": self.ldm.condition,
            "guidance_scale": None if conditions is None else conditions.scale,
            "schedule": self.schedule.summary(),
        }
        began, sr_seconds, writing = time.perf_counter(), 0.0, 0.0
        kept: list[Samples] = []
        with tqdm(
            total=calls * len(batches), disable=not progress, unit="step", desc=info["task"]
        ) as bar:
            for indices in batches:
                rows = slice(indices.start - start, indices.stop - start)
                with torch.no_grad(), _maybe_autocast(self.device, autocast):
                    network = self._eps_fn(conditions, rows)  # the encoder runs here
                eps = _CountedEps(network, autocast, bar)
                with torch.no_grad():
                    z = run(eps, indices)
                    decoded = self.ldm.decode_latents(z)
                if eps.calls != calls:
                    raise RuntimeError(f"{info['task']}: {eps.calls} network calls, not {calls}")
                low = grey(decoded).float().cpu()
                samples = Samples(low, z.float().cpu())
                if self.upscaler is not None:
                    options = sr_options or {}
                    # Per batch, with the images' own numbers: the same noise as one call.
                    high = self.upscaler(
                        low, seed=seed, start=indices.start, progress=progress, **options
                    )
                    sr_seconds += self.upscaler.last_run["sr_seconds"]  # type: ignore[index]
                    self.last_run |= self.upscaler.last_run  # type: ignore[arg-type]
                    self.last_run |= {"image_size": high.shape[-1], "sr_seconds": sr_seconds}
                    samples = Samples(high, samples.latents, low)
                if on_batch is not None:
                    handed = time.perf_counter()
                    on_batch(rows.start, samples)
                    writing += time.perf_counter() - handed  # the caller's time, not ours
                else:
                    kept.append(samples)
        seconds = time.perf_counter() - began - writing
        self.last_run["seconds"] = round(seconds - sr_seconds, 3)
        log.info(
            "%s: %d images, %s %d steps asked -> %d network calls each, %.1f s on %s (%s)",
            info["task"],
            n,
            info["sampler"],
            info["steps"],
            calls,
            seconds,
            self.device,
            self.last_run["dtype"],
        )
        if on_batch is not None:
            return None
        low_res = [s.low_res for s in kept if s.low_res is not None]
        result = Samples(
            torch.cat([s.images for s in kept]),
            torch.cat([s.latents for s in kept]),
            torch.cat(low_res) if low_res else None,
        )
        return result if return_latents else result.images


class _Conditions(NamedTuple):
    """The token ids of a run's images (one row each), the null condition's, the scale."""

    ids: Tensor
    null_ids: Tensor
    scale: float


def _per_image(value: Any, n: int, what: str) -> list[Any]:
    """One condition for all n images, or a list of exactly n."""
    vector = getattr(value, "ndim", None) == 1  # one label vector (tensor or array)
    if isinstance(value, (str, Mapping)) or vector:
        return [value] * n
    try:
        items = list(value)
    except TypeError:
        raise ConditionError(
            f"{what}: one value for all images or a sequence of {n}, not {type(value).__name__}"
        ) from None
    if is_label_vector(items):  # one label vector as a list (NaN or None where not mentioned)
        return [items] * n
    if len(items) != n:
        raise ValueError(f"{len(items)} {what} values for {n} images: give one, or one per image")
    return items


def _maybe_autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(
        device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None
    )


def _sampler_name(sampler: str) -> str:
    try:
        return SAMPLER_ALIASES[sampler]
    except KeyError:
        raise ValueError(f"sampler {sampler!r}: choose from {list(SAMPLER_NAMES)}") from None


def _as_batch(x: Tensor, what: str) -> Tensor:
    """(H, W) -> (1, 1, H, W); (C, H, W) -> (1, C, H, W); (B, C, H, W) as it is."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{what}: a tensor, not {type(x).__name__} (load_image/load_mask read PNGs)"
        )
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    if x.ndim == 4:
        return x
    raise ValueError(f"{what}: expected (B, C, H, W), (C, H, W) or (H, W), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- files


def _to_uint8(image: Tensor) -> Any:
    """(1, H, W) or (H, W) in [0, 1] -> an (H, W) uint8 array, rounded to nearest."""
    array = image.detach().float().cpu().clamp(0, 1)
    if array.ndim == 3:
        if array.shape[0] != 1:
            raise ValueError(f"expected grey images (1, H, W), got {tuple(array.shape)}")
        array = array[0]
    return (array * 255).round().to(torch.uint8).numpy()


def save_images(
    images: Tensor,
    out_dir: str | Path,
    prefix: str = "sample",
    *,
    start: int = 0,
    text: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write (N, 1, H, W) images in [0, 1] as 8-bit grey PNGs ``{prefix}_{start + i:05d}.png``.

    Values are rounded to the nearest of 256 levels (the official tutorial truncates).
    ``text``: PNG text chunks for every image, or one mapping per image (provenance, see
    :mod:`cheff.provenance`). ``names``: file stems to use instead (``NAME.png``).
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if text is not None and not isinstance(text, Mapping) and len(text) != len(images):
        raise ValueError(f"{len(text)} text mappings for {len(images)} images")
    paths = []
    for offset, image in enumerate(images):
        stem = names[offset] if names is not None else f"{prefix}_{start + offset:05d}"
        path = out / f"{stem}.png"
        chunks = text if isinstance(text, Mapping) or text is None else text[offset]
        info = None
        if chunks:
            info = PngInfo()
            for key, value in chunks.items():
                info.add_itxt(key, value)  # UTF-8: reports may hold any character
        # Written whole or not at all: a run stopped mid-write must not leave a cut-off PNG
        # that carries the cheff:synthetic mark (`cheff eval fid` would count it).
        partial = path.with_name(f".{path.name}.partial")
        Image.fromarray(_to_uint8(image), mode="L").save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
        paths.append(path)
    return paths


def save_grid(
    images: Tensor, path: str | Path, nrow: int | None = None, *, padding: int = 2
) -> Path:
    """One 8-bit grey PNG of (N, 1, H, W) images, ``nrow`` per row (default ceil(sqrt(N))),
    ``padding`` black pixels between and around them."""
    from PIL import Image

    count = images.shape[0]
    if count == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    height, width = images.shape[-2:]
    canvas = torch.zeros(
        rows * (height + padding) + padding, nrow * (width + padding) + padding, dtype=torch.uint8
    )
    for index, image in enumerate(images):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        canvas[top : top + height, left : left + width] = torch.from_numpy(_to_uint8(image))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.numpy(), mode="L").save(path)
    return path


def _read_grey(path: str | Path, size: int | None, resample: int) -> Tensor:
    """A PNG (or any PIL image) as (H, W) float in [0, 1], centre-cropped to a square and
    resized to ``size``. 16-bit files keep their precision (scaled as
    :func:`cheff.greyscale.grey_pixels` does); RGB goes through PIL's luma."""
    import numpy as np
    from PIL import Image

    from cheff.greyscale import read_grey_file

    array = read_grey_file(path)
    height, width = array.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array = np.ascontiguousarray(array[top : top + side, left : left + side])
    if size is not None and side != size:
        resized = Image.fromarray(array, mode="F").resize((size, size), resample)
        array = np.asarray(resized, dtype=np.float32)
    return torch.from_numpy(array.copy()).clamp(0, 1)


def load_image(path: str | Path, size: int | None = 256) -> Tensor:
    """An image file as (1, 1, size, size) in [0, 1], ready for :meth:`Pipeline.inpaint`.

    Non-square images are centre-cropped; resizing is bicubic (antialiased when shrinking).
    """
    from PIL import Image

    return _read_grey(path, size, Image.Resampling.BICUBIC)[None, None]


def load_mask(path: str | Path, size: int | None = 256, *, invert: bool = False) -> Tensor:
    """A mask file as (1, 1, size, size) of 0/1: **white (>= 50 % grey) = keep**, black =
    generate, matching the tensor convention (1 = keep). ``invert`` reads the opposite
    convention of most in-painting tools (white = area to repaint). Resized nearest."""
    from PIL import Image

    keep = _read_grey(path, size, Image.Resampling.NEAREST) >= 0.5
    return (~keep if invert else keep).float()[None, None]
