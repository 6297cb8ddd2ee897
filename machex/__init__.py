"""MaCheX: six public chest X-ray datasets built into one collection of 1024x1024 frontal
images in WebDataset shards, with unified parquet manifests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from machex.manifests import load_manifest


def __getattr__(name: str) -> Any:
    # Lazy: build workers import machex.assemble, which needs neither pandas nor pyarrow;
    # importing them eagerly here would add ~1 s to every worker's start.
    if name == "load_manifest":
        from machex.manifests import load_manifest

        return load_manifest
    raise AttributeError(f"module 'machex' has no attribute {name!r}")


__all__ = ["__version__", "load_manifest"]
