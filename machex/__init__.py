"""MaCheX: six public chest X-ray datasets built into one collection of 1024x1024 frontal
images in WebDataset shards, with unified parquet manifests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from machex.dataset import MaCheX, collate
    from machex.manifests import load_manifest
    from machex.resampling import resize

#: Public names imported on first use (``import machex`` stays free of torch and pandas).
_LAZY = {
    "load_manifest": "machex.manifests",
    "MaCheX": "machex.dataset",
    "collate": "machex.dataset",
    "resize": "machex.resampling",
}


def __getattr__(name: str) -> Any:
    # Lazy: build workers import machex.assemble, which needs neither pandas nor pyarrow;
    # importing them eagerly here would add ~1 s to every worker's start.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'machex' has no attribute {name!r}")


__all__ = ["MaCheX", "__version__", "collate", "load_manifest", "resize"]
