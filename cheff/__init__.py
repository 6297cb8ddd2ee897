"""Cheff: cascaded latent diffusion for high-resolution chest X-ray synthesis.

The models, samplers and training loops arrive with the cheff issues; for now this package
only reserves the name and its version.
"""

__version__ = "0.1.0"
