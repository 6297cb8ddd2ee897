"""Summary statistics of a built collection, from its manifests and build.json only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from machex import __version__
from machex.build import read_build_file
from machex.manifests import load_manifest
from machex.records import FINDINGS


def _count_by(frame: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    if frame.empty:
        return {}
    counts = frame.groupby(["source", column], dropna=False).size()
    result: dict[str, dict[str, int]] = {}
    for (source, value), n in counts.items():
        label = "unknown" if pd.isna(value) else str(value)
        result.setdefault(source, {})[label] = int(n)
    return result


def _age_quartiles(images: pd.DataFrame) -> dict[str, dict[str, float | int | None]]:
    result = {}
    for source, group in images.groupby("source"):
        ages = group["age"].dropna()
        quantiles = ages.quantile([0, 0.25, 0.5, 0.75, 1]).tolist() if len(ages) else [None] * 5
        result[source] = dict(zip(("min", "q1", "median", "q3", "max"), quantiles)) | {
            "missing": int(group["age"].isna().sum())
        }
    return result


def _label_prevalence(labels: pd.DataFrame) -> dict[str, dict[str, dict[str, float | int]]]:
    result = {}
    for source, group in labels.groupby("source"):
        per_finding = {}
        for finding in FINDINGS:
            column = group[finding]
            positive = int((column == 1).sum())
            per_finding[finding] = {
                "positive": positive,
                "negative": int((column == 0).sum()),
                "uncertain": int((column == -1).sum()),
                "not_mentioned": int(column.isna().sum()),
                "prevalence": positive / len(group) if len(group) else 0.0,
            }
        result[source] = per_finding
    return result


def collection_stats(out: Path) -> dict[str, object]:
    """Every figure ``machex stats`` shows, as one JSON-ready dict."""
    out = Path(out)
    # Only the columns counted: the reports' texts alone are gigabytes at full size.
    images = load_manifest(out, "images", columns=["split", "view", "sex", "age"])
    labels = load_manifest(out, "labels", columns=FINDINGS)
    reports = load_manifest(out, "reports", columns=[])
    boxes = load_manifest(out, "bboxes", columns=["key"])
    failures = load_manifest(out, "failures", columns=["error_type"])
    builds = read_build_file(out).get("sources", {})
    return {
        "machex_version": __version__,
        "out": str(out),
        "total_images": len(images),
        "images": _count_by(images, "split"),
        "views": _count_by(images, "view"),
        "sex": _count_by(images, "sex"),
        "age": _age_quartiles(images),
        "labels": _label_prevalence(labels),
        "reports": {s: int(n) for s, n in reports.groupby("source").size().items()},
        "bboxes": {
            s: {"boxes": len(g), "images": int(g["key"].nunique())}
            for s, g in boxes.groupby("source")
        },
        "failures": _count_by(failures, "error_type"),
        "skipped": {s: e.get("skipped", {}) for s, e in builds.items()},
        "builds": {
            s: {
                k: e.get(k)
                for k in (
                    "status",
                    "licence",
                    "planned",
                    "to_build",
                    "built",
                    "failed",
                    "failure_rate",
                    "known_bad",
                    "finished",
                )
            }
            for s, e in builds.items()
        },
    }
