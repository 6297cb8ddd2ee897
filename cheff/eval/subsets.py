"""Which images a capped evaluation (``--n``, ``--limit``) looks at.

Held-out sets and image folders come ordered (MaCheX by source, folders by name), so their
first N images are one or two sources' (``--n 5000`` of the paper's held-out set would score
against BRAX and part of ChestX-ray14 alone). A seeded uniform draw keeps every source in
proportion and gives the same images run after run.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

T = TypeVar("T")

#: The seed of every capped evaluation's draw (recorded in its JSON).
SUBSET_SEED = 0


def drawn_indices(total: int, n: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """``n`` of ``range(total)`` drawn uniformly without replacement, in ascending order (all
    of them when ``n`` is None or at least ``total``)."""
    if n is not None and n < 1:
        raise ValueError(f"at least 1 image is needed, got n={n}")
    if n is None or n >= total:
        return list(range(total))
    chosen = np.random.default_rng(seed).choice(total, size=n, replace=False)
    return sorted(int(i) for i in chosen)


def drawn(items: list[T], n: int | None) -> tuple[list[T], dict[str, object] | None]:
    """:func:`drawn_indices` of ``items`` applied to them, and the draw's record."""
    return [items[i] for i in drawn_indices(len(items), n)], draw_record(len(items), n)


def draw_record(total: int, n: int | None, seed: int = SUBSET_SEED) -> dict[str, object] | None:
    """What a JSON says of the draw: None when every image was used."""
    if n is None or n >= total:
        return None
    return {"drawn": n, "of": total, "seed": seed, "how": "uniform without replacement"}
