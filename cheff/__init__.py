"""Cheff: cascaded latent diffusion for high-resolution chest X-ray synthesis.

Public names are imported lazily so that ``import cheff`` stays cheap::

    from cheff import load_autoencoder
    ae = load_autoencoder("cheff_autoencoder.pt").to("cuda")
    posterior = ae.encode(x)          # x: (B, 3, 256, 256) in [-1, 1]
    x_hat = ae.decode(posterior.mean)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AutoencoderKL": "cheff.models.autoencoder",
    "AutoencoderConfig": "cheff.config",
    "LatentDiffusion": "cheff.models.ldm",
    "UNetModel": "cheff.models.unet",
    "UNetConfig": "cheff.models.unet",
    "PRESETS": "cheff.config",
    "CheckpointError": "cheff.checkpoints",
    "load_autoencoder": "cheff.checkpoints",
    "save_autoencoder": "cheff.checkpoints",
    "load_ldm": "cheff.checkpoints",
    "save_ldm": "cheff.checkpoints",
    "load_sr": "cheff.checkpoints",
    "save_sr": "cheff.checkpoints",
    "SuperResolution": "cheff.models.sr",
    "SRUNet": "cheff.models.sr_unet",
    "SRUNetConfig": "cheff.models.sr_unet",
    "Upscaler": "cheff.upscale",
    "Conditioner": "cheff.conditioning",
    "read_provenance": "cheff.provenance",
    "read_checkpoint": "cheff.checkpoints",
    "convert": "cheff.checkpoints",
    "Pipeline": "cheff.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cheff' has no attribute {name!r}")
