"""Why an image could not be decoded: the two errors every decoder raises."""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """The file is not a decodable image (missing, truncated, unsupported)."""


class DecompressionBombError(ImageDecodeError):
    """The header declares more pixels than ``max_pixels``."""


def transparency_reason(count: int, total: int, marked: str) -> str:
    """Why an image with ``count`` of its ``total`` pixels transparent is refused; ``marked``
    says what makes them so (``alpha < 255``, a transparency key). Callers prefix the file's
    name."""
    share = f"{100 * count / total:.1f}" if total else "0.0"
    if share == "0.0" and count:
        share = "< 0.1"
    elif share == "100.0" and count < total:
        share = "> 99.9"
    return (
        f"{share} % of pixels ({count:,} of {total:,}) are transparent ({marked}): "
        "expected an opaque radiograph"
    )
