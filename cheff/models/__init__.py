"""Plain ``nn.Module``s of the Cheff cascade: no losses, optimisers, schedules or sampling."""

from cheff.models.autoencoder import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "DiagonalGaussian"]
