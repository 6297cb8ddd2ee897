"""One overview figure of a built collection, from its manifests only.

Drawn on a bare ``Figure`` with the Agg canvas: no pyplot, so no global backend or figure state
is touched in the caller's process (a notebook or a GUI keeps its own backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from machex.manifests import load_manifest
from machex.records import FINDINGS, SPLITS

#: The figure is always FIGSIZE inches at DPI: a PNG of exactly 1600x1000 pixels.
FIGSIZE = (16.0, 10.0)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
AGE_BINS = np.arange(0, 105, 5)
SEXES = ("F", "M", "unknown")


def _splits_panel(ax: Axes, images: pd.DataFrame, sources: list[str]) -> None:
    counts = images.groupby(["source", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=sources, fill_value=0)
    order = [s for s in SPLITS if s in counts] + sorted(set(counts) - set(SPLITS))
    bottom = np.zeros(len(sources))
    for split in order:
        values = counts[split].to_numpy(dtype=float)
        ax.bar(sources, values, bottom=bottom, label=split)
        bottom += values
    ax.set_title("Images per source and split")
    ax.set_ylabel("images")
    ax.legend(title="split")


def _labels_panel(ax: Axes, labels: pd.DataFrame, sources: list[str]) -> None:
    positive = np.full((len(sources), len(FINDINGS)), np.nan)
    for i, source in enumerate(sources):
        group = labels[labels["source"] == source]
        findings = group[list(FINDINGS)]
        annotated = findings.notna().any().to_numpy()  # never mentioned: blank, not "0 %"
        if len(group):
            share = (findings == 1).sum().to_numpy(dtype=float) / len(group)
            positive[i] = np.where(annotated, share, np.nan)
    image = ax.imshow(np.ma.masked_invalid(positive), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(FINDINGS)), FINDINGS, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(sources)), sources)
    bright = 0.6 * np.nanmax(positive) if np.isfinite(positive).any() else 0.0
    for (i, j), value in np.ndenumerate(positive):
        if value == value:  # not NaN; dark text on the bright end of viridis
            colour = "k" if value > bright else "w"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.figure.colorbar(image, ax=ax, label="share positive (1)")
    ax.set_title("Unified label prevalence by source (blank: not annotated)")


def _age_panel(ax: Axes, images: pd.DataFrame, sources: list[str]) -> None:
    drawn = False
    for source in sources:
        ages = images.loc[images["source"] == source, "age"].dropna().to_numpy(dtype=float)
        if len(ages):
            clipped = np.clip(ages, AGE_BINS[0], AGE_BINS[-1] - 0.5)
            weights = np.full(len(ages), 1 / len(ages))
            ax.hist(clipped, AGE_BINS, weights=weights, histtype="step", label=source, lw=1.5)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no ages recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Age per source (share of images per 5-year bin; over 100 in the last)")
    ax.set_xlim(AGE_BINS[0], AGE_BINS[-1])
    ax.set_xlabel("age (years)")
    ax.set_ylabel("share of images with an age")


def _sex_panel(ax: Axes, images: pd.DataFrame, sources: list[str]) -> None:
    sex = images["sex"].where(images["sex"].isin(SEXES[:2]), "unknown")
    share = pd.crosstab(images["source"], sex, normalize="index")
    share = share.reindex(index=sources, columns=list(SEXES), fill_value=0.0)
    width = 0.8 / len(SEXES)
    x = np.arange(len(sources))
    for k, value in enumerate(SEXES):
        ax.bar(x + (k - 1) * width, share[value].to_numpy(dtype=float), width, label=value)
    ax.set_xticks(x, sources)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images")
    ax.set_title("Sex distribution per source")
    ax.legend(title="sex")


def plot_collection(out: Path, path: Path) -> Path:
    """Write the overview PNG of the collection in ``out`` to ``path`` and return ``path``.

    Four panels: images per source and split, label prevalence, ages, sexes. The PNG is
    always ``PIXELS`` (1600x1000) so reports and tests can rely on its size.
    """
    images = load_manifest(out, "images")
    if images.empty:
        raise ValueError(f"{out}: no images in the manifests; build a source first")
    labels = load_manifest(out, "labels")
    sources = sorted(images["source"].unique())
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    _splits_panel(axes[0, 0], images, sources)
    _labels_panel(axes[0, 1], labels, sources)
    _age_panel(axes[1, 0], images, sources)
    _sex_panel(axes[1, 1], images, sources)
    figure.suptitle(f"MaCheX collection: {len(images):,} images from {len(sources)} source(s)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path
