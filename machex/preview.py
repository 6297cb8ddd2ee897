"""A contact sheet of a built collection: N images with their key, source, positive unified
findings and boxes, chosen at random (seeded) from the images joined with their labels.

Drawn on a bare ``Figure`` with the Agg canvas, like ``machex.plots``: no pyplot state.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from machex.manifests import load_manifest
from machex.records import FINDINGS
from machex.shards import read_member
from machex.verify import NotACollection

COLUMNS = 4
#: Each cell is CELL inches at DPI: the PNG is 1600 px wide and 450 px per row of 4 images
#: (1600x1800 for the default 16).
CELL = (4.0, 4.5)
DPI = 100
THUMB = 384  # longest side of a thumbnail, in pixels


class PreviewError(ValueError):
    """Nothing to show: a bad ``--where``, an unknown source, or no matching image."""


@dataclass
class PreviewResult:
    path: Path
    keys: list[str]
    width: int
    height: int
    matched: int  # rows matching the selection, before sampling

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "keys": self.keys,
            "width": self.width,
            "height": self.height,
            "matched": self.matched,
        }


def figure_pixels(n: int) -> tuple[int, int]:
    """The PNG size for ``n`` images."""
    rows = max(1, math.ceil(n / COLUMNS))
    return int(CELL[0] * COLUMNS * DPI), int(CELL[1] * rows * DPI)


def select(out: Path, source: str | None = None, where: str | None = None) -> pd.DataFrame:
    """The images table joined with labels (on source and key), filtered."""
    out = Path(out)
    if not (out / "manifests" / "images").is_dir():
        raise NotACollection(f"{out} holds no MaCheX build (no manifests/images/)")
    sources = [source] if source else None
    images = load_manifest(out, "images", sources)
    if source and images.empty:
        built = sorted(set(load_manifest(out, "images")["source"]))
        raise PreviewError(f"--source {source}: not built in {out} (built: {built})")
    labels = load_manifest(out, "labels", sources).drop(columns=["native_labels"])
    frame = images.merge(labels, on=["source", "key"], how="left")
    if where:
        try:
            frame = frame.query(where, engine="python")
        except Exception as error:  # noqa: BLE001 - any query error is the user's expression
            raise PreviewError(f"--where {where!r}: {type(error).__name__}: {error}") from None
    return frame


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def positives(row: pd.Series) -> list[str]:
    return [f for f in FINDINGS if f in row and not pd.isna(row[f]) and row[f] == 1]


def preview_grid(
    out: Path,
    dest: Path,
    *,
    source: str | None = None,
    where: str | None = None,
    n: int = 16,
    seed: int = 0,
) -> PreviewResult:
    """Write a PNG contact sheet of up to ``n`` images chosen at random (``seed``)."""
    if n < 1:
        raise PreviewError(f"--n must be at least 1, got {n}")
    out = Path(out)
    frame = select(out, source, where)
    if frame.empty:
        raise PreviewError("no image matches the selection")
    chosen = frame.sample(n=min(n, len(frame)), random_state=seed)
    boxes = load_manifest(out, "bboxes", sorted(set(chosen["source"])))
    boxes = boxes[boxes["key"].isin(set(chosen["key"]))]

    width, height = figure_pixels(n)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    rows = max(1, math.ceil(n / COLUMNS))
    axes = figure.subplots(rows, COLUMNS, squeeze=False)
    top = 1 - 0.5 / (height / DPI)  # room for the first row's captions
    figure.subplots_adjust(left=0.01, right=0.99, top=top, bottom=0.01, wspace=0.04, hspace=0.3)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (_, row) in zip(axes.flat, chosen.iterrows(), strict=False):
        data = read_member(out / row["shard"], int(row["offset"]), int(row["size"]))
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            frame_size = image.size
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.uint32) >> 8
                image = Image.fromarray(pixels.astype(np.uint8), mode="L")
            thumb = image.convert("L")
            thumb.thumbnail((THUMB, THUMB))
        scale_x = thumb.width / frame_size[0]
        scale_y = thumb.height / frame_size[1]
        ax.imshow(np.asarray(thumb), cmap="gray", vmin=0, vmax=255)
        for box in boxes[boxes["key"] == row["key"]].itertuples(index=False):
            ax.add_patch(
                Rectangle(
                    (box.x * scale_x, box.y * scale_y),
                    box.width * scale_x,
                    box.height * scale_y,
                    fill=False,
                    edgecolor="red",
                    linewidth=1,
                )
            )
            ax.text(
                box.x * scale_x, box.y * scale_y, str(box.label), color="red", fontsize=6,
                va="bottom",
            )  # fmt: skip
        found = ", ".join(positives(row)) or "no positive finding"
        caption = "\n".join(
            [
                _short(str(row["key"]), 48),
                f"{row['source']} · {row['split']}",
                *textwrap.wrap(found, 52)[:2],
            ]
        )
        ax.set_title(caption, fontsize=7, loc="left")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(dest, dpi=DPI, format="png")
    return PreviewResult(dest, [str(k) for k in chosen["key"]], width, height, len(frame))
