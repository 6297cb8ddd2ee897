"""The registry of sources: ``--source`` choices, ``machex sources`` and the contract tests
all read ``ADAPTERS``. It is discovered: every module of this package except ``base`` holds
exactly one ``SourceAdapter``, so adding a dataset is adding its module (and its tables in
``manifests/<name>/``), nothing else."""

from __future__ import annotations

import importlib
import pkgutil
import re

from machex.adapters.base import MetadataError, SourceAdapter, SourcePlan


def _discover() -> dict[str, SourceAdapter]:
    adapters: dict[str, SourceAdapter] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        classes = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, SourceAdapter)
            and value.__module__ == module.__name__
        ]
        if len(classes) != 1:
            raise ImportError(
                f"{module.__name__} must define exactly one SourceAdapter subclass, "
                f"found {[c.__name__ for c in classes]}"
            )
        adapter = classes[0]()
        _check(adapter, module.__name__)
        if adapter.name in adapters:
            raise ImportError(f"two adapters are named {adapter.name!r}")
        adapters[adapter.name] = adapter
    return dict(sorted(adapters.items()))


#: What every adapter must set (``machex sources`` shows them; the name makes keys and folders).
REQUIRED = ("name", "title", "homepage", "licence", "citation", "metadata_files")


def _check(adapter: SourceAdapter, module: str) -> None:
    """A new adapter's mistakes, named at import: a missing attribute failed only in
    ``machex sources``; a name with capitals could not be chosen, one with a dot made keys
    that do not start with it."""
    missing = [name for name in REQUIRED if not hasattr(adapter, name)]
    if missing:
        raise ImportError(f"{module}: the adapter sets no {', '.join(missing)}")
    if not re.fullmatch(r"[a-z][a-z0-9]*", adapter.name):
        raise ImportError(
            f"{module}: adapter name {adapter.name!r}: lowercase letters and digits, starting "
            "with a letter (it names the keys, shard folders and manifests/<name>/)"
        )


ADAPTERS: dict[str, SourceAdapter] = _discover()
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
