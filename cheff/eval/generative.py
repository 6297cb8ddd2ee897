"""Generative metrics on feature sets: FID, KID, improved precision and recall.

Pure functions of two feature arrays (rows = images), computed in float64 with numpy, as
torch-fidelity (and torchmetrics, which wraps it) computes them
(``../shared/fid-inception/FORMAT.md`` section 4):

- FID: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 sum sqrt(eig(S1 S2)) (real parts; covariances with
  N - 1);
- KID: the unbiased MMD^2 with the kernel (a . b / d + 1)^3, over ``subsets`` random subsets of
  ``subset_size`` rows of each set drawn by ``numpy.random.RandomState(seed)`` (set 1, then set
  2, per subset); mean and population std;
- precision / recall (Kynkaanniemi et al. 2019): the share of fake features inside the union
  of the real k-NN balls, and of real features inside the fake ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
PR_NEIGHBOURS = 3


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"{name}: expected (N >= 2, D) features, got shape {array.shape}")
    return array


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The Frechet distance of N(mu1, S1) and N(mu2, S2)."""
    eigenvalues = np.linalg.eigvals(np.asarray(s1, np.float64) @ np.asarray(s2, np.float64))
    root_trace = np.sqrt(eigenvalues.astype(np.complex128)).real.sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * root_trace)


def fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """FID between two feature sets (rows = images)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} and {y.shape[1]}")
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


class KID(NamedTuple):
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid_from_features(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> KID:
    """KID (torch-fidelity's defaults); ``subset_size`` is capped at the smaller set's size."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 rows in each set")
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    values = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), size, replace=False)]
        b = y[rng.choice(len(y), size, replace=False)]
        k_aa = (a @ a.T / d + 1) ** 3
        k_bb = (b @ b.T / d + 1) ** 3
        k_ab = (a @ b.T / d + 1) ** 3
        same = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (size * (size - 1))
        values.append(same - 2 * k_ab.sum() / size**2)
    return KID(float(np.mean(values)), float(np.std(values)), subsets, size)


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


# Rows of the distance matrix computed at a time: 1024 x 25,000 float64 is 200 MB, where the
# whole 25,000 x 25,000 matrix of the paper's sample sizes would be 5 GB (and 3 of them at once).
_BLOCK_ROWS = 1024


def _radii(features: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row (block by block)."""
    radii = np.empty(len(features))
    for start in range(0, len(features), _BLOCK_ROWS):
        distances = _pairwise(features[start : start + _BLOCK_ROWS], features)
        rows = np.arange(len(distances))
        distances[rows, start + rows] = np.inf  # not its own neighbour
        radii[start : start + len(distances)] = np.partition(distances, k - 1, axis=1)[:, k - 1]
    return radii


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def _covered(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """The share of ``queries`` inside some centre's ball (block by block)."""
    inside = 0
    for start in range(0, len(queries), _BLOCK_ROWS):
        block = _pairwise(queries[start : start + _BLOCK_ROWS], centres)
        inside += int((block <= radii[None]).any(1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> PrecisionRecall:
    """Improved precision (fake inside real manifold) and recall (real inside fake manifold)."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if k >= min(len(real), len(fake)):
        raise ValueError(f"k = {k} needs more than k rows in each set")
    precision = _covered(fake, real, _radii(real, k))
    recall = _covered(real, fake, _radii(fake, k))
    return PrecisionRecall(precision, recall, k)
