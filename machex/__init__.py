"""MaCheX: six public chest X-ray datasets built into one collection of 1024x1024 frontal
images in WebDataset shards, with unified parquet manifests."""

from __future__ import annotations

__version__ = "0.1.0"

from machex.manifests import load_manifest  # noqa: E402

__all__ = ["__version__", "load_manifest"]
