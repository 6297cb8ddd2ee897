"""Why an image could not be decoded: the two errors every decoder raises."""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """The file is not a decodable image (missing, truncated, unsupported)."""


class DecompressionBombError(ImageDecodeError):
    """The header declares more pixels than ``max_pixels``."""
