"""The registry of sources: ``--source`` choices, ``machex sources`` and the contract tests
all read ``ADAPTERS``. Adding a dataset adds one line here."""

from __future__ import annotations

from machex.adapters.base import MetadataError, SourceAdapter, SourcePlan
from machex.adapters.brax import BraxAdapter
from machex.adapters.chexpert import CheXpertAdapter
from machex.adapters.nih import NIHAdapter
from machex.adapters.vindr import VinDrAdapter

ADAPTERS: dict[str, SourceAdapter] = {
    a.name: a for a in (NIHAdapter(), CheXpertAdapter(), VinDrAdapter(), BraxAdapter())
}
ALIASES: dict[str, str] = {alias: a.name for a in ADAPTERS.values() for alias in a.aliases}


def get_adapter(name: str) -> SourceAdapter:
    """The adapter for a source name or alias (case-insensitive)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ADAPTERS:
        choices = sorted([*ADAPTERS, *ALIASES])
        raise MetadataError(f"unknown source {name!r}; choose one of {choices}")
    return ADAPTERS[key]


__all__ = ["ADAPTERS", "ALIASES", "MetadataError", "SourceAdapter", "SourcePlan", "get_adapter"]
