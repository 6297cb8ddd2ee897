"""A latent diffusion model as Cheff ships it: the denoising U-Net, the autoencoder, the scale.

Only the pieces a sampler or trainer calls on the model live here; schedules and samplers are
in ``cheff.diffusion``. The official ``LatentDiffusion`` also holds its schedule buffers and an
EMA copy of the U-Net; :func:`cheff.checkpoints.load_ldm` picks one set of U-Net weights (live or
EMA) and puts it in :attr:`LatentDiffusion.unet`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from cheff.models.autoencoder import AutoencoderKL
from cheff.models.unet import UNetModel

if TYPE_CHECKING:
    from cheff.diffusion.schedules import NoiseSchedule

CONDITIONING_KEYS = (None, "crossattn")


class LatentDiffusion(nn.Module):
    """``unet`` predicts the noise of latents; ``autoencoder`` maps images to and from them.

    Latents the U-Net sees are ``scale_factor`` times the autoencoder's posterior mean: 1.0 for
    the unconditional Cheff model, 0.18215 for the report-conditioned one (FORMAT.md 3a/3b).
    ``conditioning_key`` is ``None`` (unconditional) or ``"crossattn"`` (a context enters
    every attention block). ``text_encoder`` (the official ``cond_stage_model``) turns token
    ids into that context: :meth:`context`. ``condition`` says what the ids stand for:
    ``"report"`` (the released t2i model) or ``"labels"`` (:mod:`cheff.conditioning`).
    ``schedule``: the noise schedule the U-Net was trained with, when the file says (ours
    store it, the paper's included; an official file's buffers, when they are not the
    paper's); :class:`cheff.Pipeline` samples with it. None: the paper's.
    """

    def __init__(
        self,
        unet: UNetModel,
        autoencoder: AutoencoderKL | None = None,
        *,
        scale_factor: float = 1.0,
        conditioning_key: str | None = None,
        text_encoder: nn.Module | None = None,
        condition: str | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> None:
        super().__init__()
        from cheff.conditioning import CONDITION_KINDS

        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(
                f"conditioning_key {conditioning_key!r}: choose from {list(CONDITIONING_KEYS)}"
            )
        if conditioning_key is None:
            if condition is not None:
                raise ValueError("an unconditional model (conditioning_key None) has no condition")
        else:
            condition = condition or "report"
            if condition not in CONDITION_KINDS:
                raise ValueError(f"condition {condition!r}: choose from {CONDITION_KINDS}")
        self.condition = condition
        self.unet = unet
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)
        self.conditioning_key = conditioning_key
        self.text_encoder = text_encoder
        self.schedule = schedule  # a plain attribute: not in the state dict, never moved

    def context(self, token_ids: Tensor) -> Tensor:
        """The text encoder's context (B, L, context_dim) for token ids (B, L)."""
        if self.text_encoder is None:
            raise RuntimeError(
                "this model has no text encoder: load a report-conditioned LDM file holding "
                "one (cond_stage_model.*)"
            )
        return self.text_encoder(token_ids)

    def eps(self, x: Tensor, t: Tensor | float, context: Tensor | None = None) -> Tensor:
        """The predicted noise of latents ``x`` at timesteps ``t`` (the official model call)."""
        if self.conditioning_key is None and context is not None:
            raise ValueError("an unconditional model takes no context")
        if self.conditioning_key == "crossattn" and context is None:
            raise ValueError("a report-conditioned model needs the text encoder's context")
        return self.unet(x, t, context)

    forward = eps

    def decode_latents(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] (unclamped) from latents: ``autoencoder.decode(z / scale_factor)``."""
        return self._autoencoder().decode(z / self.scale_factor)

    def encode_images(self, x: Tensor, *, scaled: bool = True) -> Tensor:
        """Latents of images in [-1, 1]: the posterior mean times ``scale_factor``.

        ``scaled=False`` gives the bare posterior mean, which is what the official in-painting
        uses as its known latent, for both models (an official quirk: for the t2i model that
        latent is 1 / 0.18215 times too large for its U-Net). Parity with it needs False.
        """
        mean = self._autoencoder().encode(x).mean
        return mean * self.scale_factor if scaled else mean

    def _autoencoder(self) -> AutoencoderKL:
        if self.autoencoder is None:
            raise RuntimeError(
                "this model has no autoencoder: load the LDM from a file holding one "
                "(first_stage_model.*) or pass ae= to load_ldm"
            )
        return self.autoencoder

    def extra_repr(self) -> str:
        return (
            f"scale_factor={self.scale_factor}, conditioning_key={self.conditioning_key!r}, "
            f"condition={self.condition!r}"
        )
