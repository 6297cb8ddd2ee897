"""Our counts beside the paper's Table 1 and summary figures (Weber et al., 2023).

The paper's numbers are data (``manifests/papers/paper-2023-table1.csv`` and
``paper-2023-summary.csv``, with the known reason for each difference in their ``note``), so a
user can check a built collection, or a dry run on metadata alone, against what was published.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from machex.manifests import load_manifest
from machex.records import FINDINGS
from machex.tables import TableError, load_composition, read_table, tables_root

if TYPE_CHECKING:
    from machex.adapters.base import SourcePlan

PAPER = "paper-2023"
#: The paper's "over 220,000 free-text reports" are MIMIC-CXR's English ones: PadChest's
#: Spanish reports are not counted towards it.
PAPER_REPORT_LANGUAGE = "en"
PAPER_FIELDS = ("patients", "train", "test", "in_machex", "share_percent")
COMPARISONS = ("exact", "at_least")

#: source -> split -> count
SplitCounts = dict[str, dict[str, int]]


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 1; ``None`` where the paper prints "–"."""

    source: str
    title: str
    patients: int | None
    train: int | None
    test: int | None
    in_machex: int
    share_percent: float
    origin: str
    note: str


@dataclass(frozen=True)
class PaperFigure:
    """One summary figure of the paper text, e.g. "over 220,000 reports" (``at_least``)."""

    figure: str
    value: int
    comparison: str
    note: str


def _number(text: str, where: str) -> int | None:
    try:
        return int(text.replace(",", "")) if text else None
    except ValueError:
        raise TableError(f"{where}: {text!r} is not a whole number or blank") from None


TABLE_COLUMNS = tuple(f.name for f in fields(PaperRow))
SUMMARY_COLUMNS = tuple(f.name for f in fields(PaperFigure))


def load_paper_table(paper: str = PAPER, root: Path | None = None) -> list[PaperRow]:
    """Table 1 of the paper, from ``manifests/papers/<paper>-table1.csv``."""
    path = (root or tables_root()) / "papers" / f"{paper}-table1.csv"
    rows = []
    for i, row in enumerate(read_table(path, TABLE_COLUMNS), 2):
        where = f"{path} row {i}"
        in_machex = _number(row["in_machex"], where)
        if in_machex is None:
            raise TableError(f"{where}: in_machex is blank")
        numbers = {c: _number(row[c], where) for c in ("patients", "train", "test")}
        share = float(row["share_percent"])
        texts = {c: row[c] for c in ("source", "title", "origin", "note")}
        rows.append(PaperRow(**texts, **numbers, in_machex=in_machex, share_percent=share))
    return rows


def load_paper_summary(paper: str = PAPER, root: Path | None = None) -> list[PaperFigure]:
    """The paper's summary figures, from ``manifests/papers/<paper>-summary.csv``."""
    path = (root or tables_root()) / "papers" / f"{paper}-summary.csv"
    figures = []
    for i, row in enumerate(read_table(path, SUMMARY_COLUMNS), 2):
        value = _number(row["value"], f"{path} row {i}")
        if value is None or row["comparison"] not in COMPARISONS:
            raise TableError(f"{path} row {i}: need a value and a comparison in {COMPARISONS}")
        figures.append(PaperFigure(row["figure"], value, row["comparison"], row["note"]))
    return figures


def _as_dicts(counters: dict[str, Counter[str]]) -> SplitCounts:
    return {source: dict(sorted(c.items())) for source, c in sorted(counters.items())}


def _by_split(frame: pd.DataFrame, split_of: pd.DataFrame) -> SplitCounts:
    merged = frame[["key", "source"]].drop_duplicates().merge(split_of, on=["key", "source"])
    result: SplitCounts = {}
    for (source, split), n in merged.groupby(["source", "split"]).size().items():
        result.setdefault(str(source), {})[str(split)] = int(n)
    return result


@dataclass(frozen=True)
class CollectionCounts:
    """What the paper counts, per source and split, for a build or a plan.

    Labels, reports and boxes are kept per split too, so that the summary figures count only
    the composition's splits; ``labelled``, ``reports`` and ``boxed_images`` are the
    per-source totals over all splits. A source present in ``images_by_split`` was built
    (or planned).
    """

    images_by_split: SplitCounts
    patients: dict[str, int]
    labelled_by_split: SplitCounts  # images with at least one non-null unified label
    reports_by_split: SplitCounts  # images with a non-empty report
    boxed_by_split: SplitCounts  # images with at least one box

    @property
    def labelled(self) -> dict[str, int]:
        return {s: sum(n.values()) for s, n in self.labelled_by_split.items()}

    @property
    def reports(self) -> dict[str, int]:
        return {s: sum(n.values()) for s, n in self.reports_by_split.items()}

    @property
    def boxed_images(self) -> dict[str, int]:
        return {s: sum(n.values()) for s, n in self.boxed_by_split.items()}

    @classmethod
    def from_plans(cls, plans: Iterable[SourcePlan]) -> CollectionCounts:
        """From dry-run plans: the records a build would write (before any image fails, and
        counting boxes that a build drops when they lie wholly outside the crop)."""
        images, labelled, reports, boxed = (defaultdict(Counter) for _ in range(4))
        patients: dict[str, int] = {}
        for plan in plans:
            images[plan.source].update(r.split for r in plan.records)
            patients[plan.source] = len({r.patient_id for r in plan.records})
            for r in plan.records:
                labelled[r.source][r.split] += any(v is not None for v in r.labels.values())
                reports[r.source][r.split] += bool(
                    r.report and r.report.text and r.report.language == PAPER_REPORT_LANGUAGE
                )
                boxed[r.source][r.split] += bool(r.boxes)
        drop_zeros = [{s: +c for s, c in d.items() if +c} for d in (labelled, reports, boxed)]
        return cls(_as_dicts(images), patients, *(_as_dicts(d) for d in drop_zeros))

    @classmethod
    def from_manifests(cls, out: Path) -> CollectionCounts:
        """From a built collection's parquet manifests (only the columns counted: reports are
        filtered as they are read, their texts never loaded whole)."""
        images = load_manifest(out, "images", columns=["key", "split", "study_id", "patient_id"])
        split_of = images[["key", "source", "split"]]
        labels = load_manifest(out, "labels", columns=["key", *FINDINGS])
        labels = labels[labels[list(FINDINGS)].notna().any(axis=1)]
        written = [("language", "==", PAPER_REPORT_LANGUAGE), ("text", "!=", "")]
        studies = load_manifest(out, "reports", columns=["study_id"], filters=written)
        with_report = images.set_index(["source", "study_id"]).index.isin(
            studies.set_index(["source", "study_id"]).index
        )
        reports = images[with_report]
        patients = images.groupby("source")["patient_id"].nunique()
        return cls(
            images_by_split=_by_split(images, split_of),
            patients={str(s): int(n) for s, n in patients.items()},
            labelled_by_split=_by_split(labels, split_of),
            reports_by_split=_by_split(reports, split_of),
            boxed_by_split=_by_split(load_manifest(out, "bboxes", columns=["key"]), split_of),
        )


def _in_composition(by_split: SplitCounts, pairs: list[tuple[str, str]]) -> dict[str, int]:
    return {
        s: sum(n.get(split, 0) for src, split in pairs if src == s) for s, n in by_split.items()
    }


def compare_with_paper(counts: CollectionCounts, composition: str = PAPER) -> dict[str, object]:
    """Table 1 and the summary figures beside our counts over ``composition``'s splits,
    JSON-ready. Sources of the paper that were not built or planned are ``not_built``."""
    pairs = load_composition(composition)
    ours = _in_composition(counts.images_by_split, pairs)
    total = sum(ours.values())
    rows = []
    for paper in load_paper_table():
        n = ours.get(paper.source)
        built = n is not None
        difference = n - paper.in_machex if n is not None else None
        status = "not_built" if not built else "match" if difference == 0 else "differs"
        rows.append(
            {
                "source": paper.source,
                "title": paper.title,
                "paper": {k: getattr(paper, k) for k in PAPER_FIELDS},
                "ours": {
                    "patients": counts.patients.get(paper.source) if built else None,
                    "in_composition": n,
                    "share_percent": round(100 * n / total, 2) if built and total else None,
                },
                "difference": difference,
                "status": status,
                "note": paper.note,
            }
        )
    ours_figures = {
        "images": total,
        "labels": sum(_in_composition(counts.labelled_by_split, pairs).values()),
        "reports": sum(_in_composition(counts.reports_by_split, pairs).values()),
        "images_with_boxes": sum(_in_composition(counts.boxed_by_split, pairs).values()),
    }
    summary = []
    for figure in load_paper_summary():
        value = ours_figures.get(figure.figure)
        ok = value is not None and (
            value == figure.value if figure.comparison == "exact" else value >= figure.value
        )
        summary.append(
            dict(
                figure=figure.figure,
                paper=figure.value,
                comparison=figure.comparison,
                ours=value,
                ok=ok,
                note=figure.note,
            )
        )
    built = [r for r in rows if r["status"] != "not_built"]
    paper_sources = {r["source"] for r in rows}
    return {
        "composition": composition,
        "rows": rows,
        "summary": summary,
        "totals": {
            "paper_in_machex": sum(r["paper"]["in_machex"] for r in rows),
            "ours_in_composition": total,
            "paper_in_machex_of_built": sum(r["paper"]["in_machex"] for r in built),
            "difference_of_built": sum(r["difference"] for r in built),
            "built": [r["source"] for r in built],
            "not_built": [r["source"] for r in rows if r["status"] == "not_built"],
            "not_in_paper": sorted(set(counts.images_by_split) - paper_sources),
        },
    }
