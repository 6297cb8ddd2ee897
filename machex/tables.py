"""Reads the declarative tables under ``manifests/``: label maps, view rules, known-bad files
and named compositions.

Everything a reviewer might want to check or change about a source without reading code
lives in these CSVs; this module only parses and validates them. Each source has a folder
``manifests/<source>/`` with:

- ``views.csv``: ``value,keep,reason``: a value of the source's view field, whether the
  default (paper) selection keeps it, and its group (``lateral``, ``decubitus``,
  ``ap_horizontal``...), by which ``--views`` opens more (``ViewSelection``).
- ``labels.csv``: ``native_label,finding,note``: which native label or column feeds which
  unified finding (blank finding: kept only in ``native_labels``).
- ``label_values.csv`` (tri-state sources): ``raw,value,note``: raw cell -> 1/0/-1/blank.
- ``absent.csv`` (closed label sets): ``finding,value,note``: the value of a finding the source
  did not list for an image (0 = negative, blank = not mentioned).
- ``uninformative.csv`` (closed label sets): ``native_label,note``: names that say nothing
  about the findings (``exclude``, ``unchanged``): an image listing only these has every
  finding null, not ``absent.csv``'s negatives.
- ``known_bad.csv``: ``source_key,reason``: files never to build.

``manifests/compositions/<name>.csv`` (``source,split,note``) names the (source, split) pairs of
a collection such as the paper's ``paper-2023``.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from machex.records import FINDINGS, Label

_ENV_VAR = "MACHEX_TABLES"


class TableError(ValueError):
    """A declarative table is malformed; the message names the file and row."""


def tables_root() -> Path:
    """Where the tables live: ``$MACHEX_TABLES``, the installed copy, or ``manifests/``."""
    if env := os.environ.get(_ENV_VAR):
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "_tables", here.parent / "manifests"):
        if candidate.is_dir():
            return candidate
    raise TableError(f"cannot find the manifests/ tables next to {here}; set {_ENV_VAR}")


def read_table(
    path: Path, columns: tuple[str, ...], *, required: bool = True
) -> list[dict[str, str]]:
    """Rows of a small CSV as dicts of stripped strings, checking the header."""
    if not path.is_file():
        if required:
            raise TableError(f"missing table {path}")
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise TableError(f"{path}: missing columns {missing}; expected {list(columns)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _label_value(text: str, where: str) -> Label:
    if text == "":
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise TableError(f"{where}: value {text!r} is not 1, 0, -1 or blank") from None
    if value not in (1, 0, -1):
        raise TableError(f"{where}: value {text!r} is not 1, 0, -1 or blank")
    return value


def _finding(text: str, where: str) -> str | None:
    if text == "":
        return None
    if text not in FINDINGS:
        raise TableError(f"{where}: unknown finding {text!r}; expected one of {list(FINDINGS)}")
    return text


#: ``--views`` words: ``frontal`` is each source's default (``keep=yes``) selection.
FRONTAL = "frontal"
VIEW_SPEC_ALIASES = {"all": ("frontal", "lateral")}


@dataclass(frozen=True)
class ViewSelection:
    """Which rows of a view table a build takes: the default ``keep=yes`` rows (``frontal``)
    and/or the rows whose ``reason`` (group) is named, e.g. ``lateral`` or ``ap_horizontal``.

    Parsed from ``--views``: ``frontal`` (default), ``lateral``, ``all`` (frontal and
    lateral), or a comma list; a leading ``+`` adds groups to the default
    (``+ap_horizontal``: PadChest's supine AP images beside its PA and AP ones).
    """

    groups: frozenset[str] = frozenset({FRONTAL})

    @classmethod
    def parse(cls, spec: str | None) -> ViewSelection:
        if spec is None or not spec.strip():
            return cls()
        text = spec.strip().lower()
        groups: set[str] = {FRONTAL} if text.startswith("+") else set()
        for word in filter(None, (w.strip() for w in re.split(r"[,+]", text))):
            if not re.fullmatch(r"[a-z0-9_]+", word):
                raise ValueError(f"--views {spec!r}: {word!r} is not a view group name")
            groups.update(VIEW_SPEC_ALIASES.get(word, (word,)))
        return cls(frozenset(groups))

    @property
    def spec(self) -> str:
        """The canonical text, as recorded in ``build.json``."""
        return ",".join(sorted(self.groups))

    def admits(self, keep: bool, reason: str) -> bool:
        return (keep and FRONTAL in self.groups) or reason in self.groups


#: The paper's selection: each view table's ``keep=yes`` rows.
DEFAULT_VIEWS = ViewSelection()


@dataclass(frozen=True)
class SourceTables:
    """The parsed tables of one source."""

    views: dict[str, tuple[bool, str]]
    label_map: dict[str, tuple[str, ...]]
    label_values: dict[str, Label] = field(default_factory=dict)
    absent: dict[str, Label] = field(default_factory=dict)
    known_bad: dict[str, str] = field(default_factory=dict)
    uninformative: frozenset[str] = frozenset()
    #: View values met that ``views.csv`` does not list, with their images (``keep_views``
    #: counts them, a plan reports them: a typo in the table, or a new value in a release,
    #: would drop images quietly).
    unlisted_views: Counter[str] = field(default_factory=Counter, compare=False)

    def says_nothing(self, native: Iterable[str]) -> bool:
        """Whether a list of native names tells nothing about the findings: empty, or only
        ``uninformative.csv`` names (then every finding is null)."""
        return all(name in self.uninformative for name in native)

    def view_decision(
        self, value: str, selection: ViewSelection = DEFAULT_VIEWS
    ) -> tuple[bool, str]:
        """(take, reason) for a raw view value under ``selection``; values the table does
        not list are never taken (``unknown_view``)."""
        keep, reason = self.views.get(value, (False, "unknown_view"))
        return (reason != "unknown_view" and selection.admits(keep, reason)), reason


def load_source_tables(source: str, root: Path | None = None) -> SourceTables:
    """Parse and validate ``manifests/<source>/``."""
    folder = (root or tables_root()) / source
    if not folder.is_dir():
        raise TableError(
            f"no tables for source {source!r} at {folder}: it needs views.csv and labels.csv "
            "(label_values.csv, absent.csv, known_bad.csv and uninformative.csv as the source "
            "needs them; docs/adding-a-source.md, step 2)"
        )

    views: dict[str, tuple[bool, str]] = {}
    for i, row in enumerate(read_table(folder / "views.csv", ("value", "keep", "reason")), 2):
        keep = row["keep"].lower()
        if keep not in ("yes", "no"):
            raise TableError(f"{folder / 'views.csv'} row {i}: keep must be yes or no")
        views[row["value"]] = (
            keep == "yes",
            row["reason"] or ("kept" if keep == "yes" else "skipped"),
        )

    label_map: dict[str, tuple[str, ...]] = {}
    labels_csv = folder / "labels.csv"
    for i, row in enumerate(read_table(labels_csv, ("native_label", "finding")), 2):
        finding = _finding(row["finding"], f"{labels_csv} row {i}")
        targets = label_map.setdefault(row["native_label"], ())
        if finding is not None:
            label_map[row["native_label"]] = (*targets, finding)

    values_csv = folder / "label_values.csv"
    label_values = {
        row["raw"]: _label_value(row["value"], f"{values_csv} row {i}")
        for i, row in enumerate(read_table(values_csv, ("raw", "value"), required=False), 2)
    }
    absent_csv = folder / "absent.csv"
    absent: dict[str, Label] = {}
    for i, row in enumerate(read_table(absent_csv, ("finding", "value"), required=False), 2):
        finding = _finding(row["finding"], f"{absent_csv} row {i}")
        if finding is None:
            raise TableError(f"{absent_csv} row {i}: finding is blank")
        absent[finding] = _label_value(row["value"], f"{absent_csv} row {i}")

    uninformative_csv = folder / "uninformative.csv"
    uninformative = set()
    for i, row in enumerate(read_table(uninformative_csv, ("native_label",), required=False), 2):
        name = row["native_label"]
        if label_map.get(name, ("unlisted",)):  # listed in labels.csv, feeding no finding
            raise TableError(
                f"{uninformative_csv} row {i}: {name!r} must be a labels.csv row with a blank "
                "finding (a name that feeds a finding is informative)"
            )
        uninformative.add(name)

    known_bad = {
        row["source_key"]: row["reason"]
        for row in read_table(folder / "known_bad.csv", ("source_key", "reason"), required=False)
    }
    return SourceTables(views, label_map, label_values, absent, known_bad, frozenset(uninformative))


def known_view_groups(root: Path | None = None) -> frozenset[str]:
    """Every view group any source's ``views.csv`` names, and ``frontal``."""
    base = root or tables_root()
    groups = {FRONTAL}
    for views in sorted(base.glob("*/views.csv")):
        groups.update(row["reason"] for row in read_table(views, ("value", "keep", "reason")))
    return frozenset(g for g in groups if g)


def load_composition(name: str, root: Path | None = None) -> list[tuple[str, str]]:
    """The (source, split) pairs of a named collection, e.g. ``paper-2023``."""
    folder = (root or tables_root()) / "compositions"
    path = folder / f"{name}.csv"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.csv"))
        raise TableError(f"unknown composition {name!r}; known: {known}")
    return [(row["source"], row["split"]) for row in read_table(path, ("source", "split"))]
