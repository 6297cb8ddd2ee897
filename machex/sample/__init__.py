"""Miniature copies of public chest X-ray datasets, in their real on-disk layout.

The MaCheX build reads every source exactly as its publisher ships it, but the real
releases are hundreds of gigabytes behind registration walls. This module writes a tiny
stand-in for each source with the same folder structure, file names, CSV headers and
cell formats as the official release (copied from the real metadata files), filled with
small synthetic radiographs, so the build tool can be demonstrated and tested offline.
The images are fake: never train or evaluate on them.

All randomness comes from an explicit ``numpy.random.Generator``; the same seed gives
byte-identical files (PNG and JPEG are written with fixed options and no timestamps).
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from machex.sample.common import synthetic_radiograph

Maker = Callable[[Path, np.random.Generator], Path]


def _discover() -> dict[str, Maker]:
    """Every module here with a ``SOURCE`` name and a ``make(dest, rng) -> root`` function
    writes one source's miniature; a new source adds its module, nothing else."""
    makers: dict[str, Maker] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if source is not None:
            makers[source] = module.make
    return dict(sorted(makers.items()))


#: source -> writer of its miniature (``make(dest, rng) -> dataset root``).
SAMPLE_MAKERS: dict[str, Maker] = _discover()
SAMPLE_SOURCES: tuple[str, ...] = tuple(SAMPLE_MAKERS)


def make_sample(
    dest: Path, sources: Sequence[str] = SAMPLE_SOURCES, *, seed: int = 0
) -> dict[str, Path]:
    """Write a miniature copy of each source under dest/<folder>; return {source: dataset root}.

    Each source gets its own random stream, derived from ``seed`` and its name, so its files
    do not depend on which other sources are generated alongside it.
    """
    if isinstance(sources, str):
        sources = (sources,)
    unknown = [name for name in sources if name not in SAMPLE_MAKERS]
    if unknown:
        raise ValueError(
            f"unknown sample source(s) {unknown}; valid choices: {', '.join(SAMPLE_SOURCES)}"
        )
    dest = Path(dest)
    roots = {
        name: SAMPLE_MAKERS[name](dest, np.random.default_rng([seed, zlib.crc32(name.encode())]))
        for name in sources
    }
    owners: dict[str, str] = {}
    for name, root in roots.items():  # two miniatures in one folder mix their files
        top = Path(root).resolve().relative_to(dest.resolve()).parts[0]
        if top in owners:
            raise ValueError(
                f"the miniatures of {owners[top]} and {name} both write {dest / top}: give "
                f"{name}'s sample module a root folder name no other source uses"
            )
        owners[top] = name
    return roots


__all__ = ["SAMPLE_MAKERS", "SAMPLE_SOURCES", "make_sample", "synthetic_radiograph"]
