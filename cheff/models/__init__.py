"""Plain ``nn.Module``s of the Cheff cascade: no losses, optimisers, schedules or sampling."""

from cheff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from cheff.models.ldm import LatentDiffusion
from cheff.models.unet import UNetConfig, UNetModel

__all__ = ["AutoencoderKL", "DiagonalGaussian", "LatentDiffusion", "UNetConfig", "UNetModel"]
