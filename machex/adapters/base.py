"""What every source adapter is, and the helpers they share.

An adapter reads one dataset's metadata, exactly as released, into ``ImageRecord``s. It never
decodes pixels and never writes files: it answers "which images, with which labels, split
and view", and the build does the rest. Anything two adapters would both need belongs here.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import warnings
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pandas as pd

from machex.records import FINDINGS, ImageRecord, Label
from machex.tables import DEFAULT_VIEWS, SourceTables, ViewSelection

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class MetadataError(ValueError):
    """The dataset root or its metadata is not what the release looks like.

    Raised before any work starts; the message names the file and what was expected.
    """


def make_key(source: str, *parts: str) -> str:
    """A sample key: ``source-part-part``, with every character WebDataset or a shell
    might trip on (dots above all: WebDataset splits a member name at its first dot)
    replaced by ``_``."""
    return _KEY_UNSAFE.sub("_", "-".join((source, *parts)))


def parse_numbers(column: pd.Series) -> list[float | int | None]:
    """A metadata column as numbers (int when whole), ``None`` where blank or not numeric.

    Vectorised: one pass in C rather than one Python call per row."""
    values = pd.to_numeric(column.str.strip(), errors="coerce").to_numpy(dtype=float)
    return [None if v != v else (int(v) if v.is_integer() else v) for v in values.tolist()]


def find_metadata(root: Path, names: str) -> Path | None:
    """The first of ``names`` (``a.csv|b.csv``: alternatives, best first) found in ``root``,
    plain or gzipped (some releases ship their CSVs as ``.csv.gz``)."""
    for name in names.split("|"):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


# What reading a damaged CSV raises: a cut-off .gz ends in EOFError (which click would turn
# into a bare "Aborted."), corrupt gzip data in zlib.error, a wrong encoding in
# UnicodeDecodeError.
CSV_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error)


def _open_csv_text(path: Path) -> IO[str]:
    """A CSV (plain or ``.gz``) as text for the ``csv`` module (BOM dropped)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV (plain or ``.gz``), from its first line only."""
    try:
        with _open_csv_text(path) as handle:
            return next(csv.reader(handle), [])
    except CSV_READ_ERRORS:
        return []


def read_metadata_csv(
    path: Path, columns: Sequence[str], *, usecols: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read a metadata CSV as Python strings (no NaN guessing: empty cells stay ``""``) and
    check that every expected column is there. ``object`` columns, not pandas' Arrow strings:
    adapters iterate over rows, and that is ~10x faster on plain ``str`` objects."""
    # pyarrow's fast count can misread a header with a quoted line break: only a row that
    # Python's csv module also finds is an error.
    line, got, expected = _first_bad_row(path, short=True) if _has_short_rows(path) else (0, 0, 0)
    if line:
        raise MetadataError(
            f"{path} row {line}: {got} fields, the header has {expected}; a truncated "
            "or corrupt download? (re-download the file)"
        )
    try:
        with warnings.catch_warnings():
            # index_col=False: rows longer than the header must not silently become an index
            # (shifting every column); pandas warns instead, and that warning is an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                dtype=object,
                keep_default_na=False,
                na_filter=False,
                usecols=usecols,
                index_col=False,
            )
    except pd.errors.ParserWarning:
        line, got, expected = _first_bad_row(path, short=False)
        first = f" (row {line}: {got} fields, the header has {expected})" if line else ""
        raise MetadataError(
            f"{path}: some rows have more fields than the header{first}; expected columns "
            f"{list(columns)} (a stray trailing comma?)"
        ) from None
    except ValueError as error:  # raised by usecols when a column is absent
        raise MetadataError(f"{path}: {error}; expected columns {list(columns)}") from None
    except (pd.errors.ParserError, *CSV_READ_ERRORS) as error:
        raise MetadataError(
            f"{path}: cannot read as CSV ({type(error).__name__}: {error}); a truncated or "
            "corrupt download? (re-download the file)"
        ) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MetadataError(f"{path}: missing columns {missing}; expected at least {list(columns)}")
    return frame


def _has_short_rows(path: Path) -> bool:
    """Whether a row has fewer fields than the header: a cut-off or corrupt download, which
    pandas pads with empty cells without a word. pyarrow's parser counts the fields of a
    160k-row file in a fraction of a second; a file it cannot parse is left to pandas."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    header = csv_header(path)
    width, named = len(header), _named_width(header)
    if not named:
        return False
    short = 0

    def count(row: pa_csv.InvalidRow) -> str:
        nonlocal short
        short += row.actual_columns < named
        return "skip"

    names = [f"c{i}" for i in range(width)]
    try:
        pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(use_threads=False, column_names=names, skip_rows=1),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=count),
            convert_options=pa_csv.ConvertOptions(
                include_columns=names[:1], column_types={names[0]: pa.binary()}
            ),
        )
    except (OSError, pa.ArrowException):
        return False
    return short > 0


def _named_width(header: list[str]) -> int:
    """Header fields up to the last named one: a header's trailing empty fields (a trailing
    comma, ``Bbox [x,y,w,h],,,``) need no cells in the rows."""
    while header and not header[-1].strip():
        header = header[:-1]
    return len(header)


def _first_bad_row(path: Path, *, short: bool) -> tuple[int, int, int]:
    """(row, fields, header fields) of the first row with fewer fields than the header names
    (``short``) or with a non-empty field past the header. The row is the line an editor
    shows (header = 1), 0 when there is none; Python's csv module counts lines, slowly, so only
    on the error path."""
    expected = 0
    try:
        with _open_csv_text(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            expected = _named_width(header) if short else len(header)
            start = reader.line_num + 1
            for row in reader:
                blank = not any(field.strip() for field in row)  # as pandas skips it
                if not blank and (
                    len(row) < expected if short else any(f.strip() for f in row[expected:])
                ):
                    return start, len(row), expected
                start = reader.line_num + 1
    except CSV_READ_ERRORS:
        pass
    return 0, 0, expected


class FileFinder:
    """Answers "is ``root/relative`` on disk?" from cached directory listings.

    One ``listdir`` per folder instead of one ``stat`` per file, and a missing folder
    answers for everything below it: a dry run over metadata with no images on disk takes
    milliseconds instead of a stat for each of 200,000 rows.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._listings: dict[str, frozenset[str]] = {}

    def find(self, relative: str) -> str | None:
        """The full path of ``relative`` (``/``-separated) if it is a file there, else None."""
        top = relative.split("/", 1)[0]
        if top not in self._names(""):  # e.g. no train/ at all: answer without recursing
            return None
        folder, _, name = relative.rpartition("/")
        if name not in self._names(folder):
            return None
        full = os.path.join(self.root, relative)
        return full if os.path.isfile(full) else None

    def _names(self, folder: str) -> frozenset[str]:
        names = self._listings.get(folder)
        if names is None:
            parent, _, name = folder.rpartition("/")
            if folder and name not in self._names(parent):
                names = frozenset()
            else:
                try:
                    names = frozenset(os.listdir(os.path.join(self.root, folder)))
                except OSError:
                    names = frozenset()
            self._listings[folder] = names
        return names


def index_files(folders: Iterable[Path], suffix: str) -> dict[str, str]:
    """``{file name: path}`` for files with ``suffix`` directly inside ``folders``.

    Uses ``os.scandir`` (one syscall per folder, not per file): indexing 112,120 NIH PNGs
    takes well under a second. The first folder that holds a name wins.
    """
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(suffix) and entry.name not in index:
                    index[entry.name] = entry.path
    return index


def index_tails(root: Path, suffix: str, depth: int) -> dict[str, str]:
    """``{last depth path components: path}`` for every ``suffix`` file anywhere under root.

    The fallback for releases that unpack into varying folders (CheXpert's AIMI batch zips):
    one walk of the tree, done only when a file is not where the metadata says.
    """
    index: dict[str, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(suffix):
                full = os.path.join(folder, name)
                tail = "/".join(Path(full).parts[-depth:])
                index.setdefault(tail, full)
    return index


@dataclass(frozen=True)
class PlanOptions:
    """What a user may choose about a source's plan: ``prefer`` the image format where a
    release ships several (``SourceAdapter.image_formats``), ``views`` the view groups,
    ``reports`` a separate report location."""

    prefer: str | None = None
    views: ViewSelection = DEFAULT_VIEWS
    #: Where a source's reports are when not under its root (MIMIC-CXR's
    #: ``mimic-cxr-reports.zip`` or its unpacked folder; ``--reports``).
    reports: Path | None = None


#: Defaults for every choice: the paper's views, each source's default image format.
DEFAULT_PLAN = PlanOptions()


def keep_views(
    frame: pd.DataFrame,
    column: str,
    tables: SourceTables,
    skipped: Counter[str],
    selection: ViewSelection = DEFAULT_VIEWS,
) -> pd.DataFrame:
    """Rows whose ``column`` value ``selection`` takes from the view table; the rest are
    counted by reason.

    Decisions are made once per distinct value (a column has a handful), then mapped."""
    values = frame[column]
    decisions = {v: tables.view_decision(v.strip(), selection) for v in values.unique()}
    keep = values.map({v: keep for v, (keep, _) in decisions.items()}).astype(bool)
    for value, count in values[~keep].value_counts().items():
        reason = decisions[value][1]
        skipped[reason] += int(count)
        if reason == "unknown_view":
            tables.unlisted_views[value.strip()] += int(count)
    return frame[keep]


def tri_state_labels(
    frame: pd.DataFrame, tables: SourceTables, where: str
) -> list[dict[str, Label]]:
    """Per-row unified labels from per-finding columns of codes such as ``1.0``, ``-1.0``, ``""``.

    The column -> finding map and the code -> value map both come from the tables; an
    unknown code is an error naming the column and value, never a silent guess.
    """
    columns: dict[str, pd.Series] = {}
    for native, findings in tables.label_map.items():
        if native not in frame.columns:
            raise MetadataError(f"{where}: missing label column {native!r}")
        raw = frame[native]
        codes = {v: tables.label_values.get(v.strip(), "?") for v in raw.unique()}
        unknown = sorted(v for v, code in codes.items() if code == "?")
        if unknown:
            # frame.index counts data rows from 0 (kept through filtering): header = row 1.
            rows = (frame.index[raw.isin(unknown).to_numpy()][:4] + 2).tolist()
            at = ", ".join(map(str, rows[:3])) + (", ..." if len(rows) > 3 else "")
            raise MetadataError(
                f"{where}: column {native!r} has values {unknown} "
                f"({'rows' if len(rows) > 1 else 'row'} {at}); "
                f"expected one of {sorted(tables.label_values)}"
            )
        coded = raw.map(codes)
        for finding in findings:
            if finding in columns:
                raise MetadataError(
                    f"{where}: two label columns feed {finding!r}; a tri-state source maps "
                    "one column per finding"
                )
            columns[finding] = coded
    rows = len(frame)
    none_column = [None] * rows
    per_finding = [
        [None if v != v else int(v) for v in columns[f].to_numpy(dtype=float)]  # NaN -> None
        if f in columns
        else none_column
        for f in FINDINGS
    ]
    return [dict(zip(FINDINGS, values)) for values in zip(*per_finding)]


def tri_state_native(frame: pd.DataFrame, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Per row, the non-empty label cells as released (``Cardiomegaly=1.0``): a tri-state
    source's ``native_labels``. Mapped once per distinct cell value, not per row."""
    cells = [
        frame[c].map({v: f"{c}={v.strip()}" if v.strip() else "" for v in frame[c].unique()})
        for c in columns
    ]
    return [tuple(filter(None, row)) for row in zip(*(c.tolist() for c in cells))]


def closed_set_labels(native: Iterable[str], tables: SourceTables) -> dict[str, Label]:
    """Unified labels from a list of native names out of a closed label set.

    A listed name maps to positive findings; a finding nobody listed takes its value from
    ``absent.csv`` (0 where the source would have said so, None where it never annotates it).
    Only ``uninformative.csv`` names: every finding None.
    """
    native = list(native)
    if native and tables.says_nothing(native):
        return dict.fromkeys(FINDINGS)
    labels: dict[str, Label] = {f: tables.absent.get(f) for f in FINDINGS}
    for name in native:
        if name not in tables.label_map:
            raise KeyError(name)
        for finding in tables.label_map[name]:
            labels[finding] = 1
    return labels


@dataclass
class SourcePlan:
    """What a build of one source will do, computed from metadata alone."""

    source: str
    root: Path
    records: list[ImageRecord]
    planned: int
    skipped: dict[str, int]
    known_bad: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: How image paths were resolved, rule -> count (for sources whose metadata paths need
    #: fixing up, e.g. BRAX's ``PngPath``); empty where paths are taken as given.
    path_rules: dict[str, int] = field(default_factory=dict)

    @property
    def missing_files(self) -> int:
        return sum(r.path is None for r in self.records)

    def summary(self) -> dict[str, object]:
        """The dry-run report: counts only, JSON-ready."""
        return {
            "root": str(self.root),
            "planned": self.planned,
            "to_build": len(self.records),
            "by_split": dict(sorted(Counter(r.split for r in self.records).items())),
            "by_view": dict(sorted(Counter(r.view for r in self.records).items())),
            "skipped": dict(sorted(self.skipped.items())),
            "known_bad": len(self.known_bad),
            "missing_files": self.missing_files,
            # Studies of the planned images, and those with a non-empty report, by language.
            "studies": len({(r.patient_id, r.study_id) for r in self.records if r.study_id}),
            "reports": dict(sorted(self._reports_by_language().items())),
            "warnings": list(self.warnings),
        } | ({"path_rules": dict(sorted(self.path_rules.items()))} if self.path_rules else {})

    def _reports_by_language(self) -> Counter[str]:
        studies = {r.report.study_id: r.report for r in self.records if r.report and r.report.text}
        return Counter(report.language for report in studies.values())


def finish_plan(
    source: str,
    root: Path,
    records: Iterable[ImageRecord],
    skipped: Counter[str],
    tables: SourceTables,
    warnings: list[str] | None = None,
    path_rules: dict[str, int] | None = None,
) -> SourcePlan:
    """Drop known-bad files and duplicate keys, sort by key (shard assignment depends on it)."""
    kept: dict[str, ImageRecord] = {}
    known_bad: list[str] = []
    planned = 0
    for record in records:
        planned += 1
        if record.source_key in tables.known_bad:
            known_bad.append(record.source_key)
        elif record.key in kept:
            if kept[record.key].source_key != record.source_key:
                raise MetadataError(
                    f"{source}: {kept[record.key].source_key} and {record.source_key} both "
                    f"make the key {record.key!r}"
                )
            skipped["duplicate_row"] += 1
            planned -= 1
        else:
            kept[record.key] = record
    ordered = [kept[k] for k in sorted(kept)]
    warnings = list(warnings or [])
    if tables.unlisted_views:
        values = ", ".join(f"{v!r} ({n:,})" for v, n in tables.unlisted_views.most_common(5))
        more = len(tables.unlisted_views) - 5
        warnings.append(
            f"{sum(tables.unlisted_views.values()):,} images have a view value that "
            f"manifests/{source}/views.csv does not list, skipped as unknown_view: {values}"
            + (f" and {more} more" if more > 0 else "")
        )
    return SourcePlan(
        source, root, ordered, planned, dict(skipped), known_bad, warnings, path_rules or {}
    )


class SourceAdapter(ABC):
    """One dataset. Subclasses set the class attributes and implement ``plan``.

    The attributes are what a reader checks first (and what ``machex sources`` shows);
    ``metadata_files`` are the files whose presence identifies the dataset root
    (``a|b`` where either will do). ``image_formats`` lists the image files a release
    ships, the default first; ``PlanOptions.prefer`` picks another (``--prefer``).
    """

    name: str
    aliases: tuple[str, ...] = ()
    title: str
    homepage: str
    licence: str
    citation: str
    metadata_files: tuple[str, ...]
    #: file name -> a column its header must have, where a name alone is ambiguous
    metadata_columns: dict[str, str] = {}
    image_formats: tuple[str, ...] = ("png",)
    #: Whether the release ships reports apart from the images (``--reports``: MIMIC-CXR).
    separate_reports: bool = False

    def holds_metadata(self, folder: Path) -> bool:
        """Whether ``folder`` holds this source's metadata files, each with its
        ``metadata_columns`` column (two releases may share a file name: CheXpert's and
        VinBigData's ``train.csv``)."""
        return not self._gaps(folder)

    def locate_root(self, root: Path) -> Path:
        """The dataset root: ``root`` itself, or its only child that holds the metadata
        (so both ``.../CheXpert-v1.0-small`` and its parent work)."""
        root = root.expanduser().resolve()
        if not root.is_dir():
            raise MetadataError(f"--root {root} is not a folder")
        if self.holds_metadata(root):
            return root
        children = [c for c in sorted(root.iterdir()) if c.is_dir() and self.holds_metadata(c)]
        if len(children) == 1:
            return children[0]
        if len(children) > 1:
            raise MetadataError(
                f"--root {root} holds several copies of {self.title}: "
                f"{[c.name for c in children]}; point --root at the one to build"
            )
        raise MetadataError(
            f"--root {root} does not look like {self.title}: {'; '.join(self._gaps(root))} "
            f"(expected the folder as unpacked from the official release, holding "
            f"{list(self.metadata_files)})"
        )

    def _gaps(self, folder: Path) -> list[str]:
        """What keeps ``folder`` from :meth:`holds_metadata`: each missing file, and each file
        whose header lacks the column that tells it apart."""
        gaps = []
        for names in self.metadata_files:
            path = find_metadata(folder, names)
            if path is None:
                gaps.append(f"missing {names}")
                continue
            column = self.metadata_columns.get(path.name.removesuffix(".gz"))
            if column is not None and column not in (header := csv_header(path)):
                seen = f"its header is {header[:6]}" if header else "it has no readable header"
                gaps.append(
                    f"{path} has no {column!r} column ({seen}; a truncated or corrupt "
                    "download, or another dataset's file?)"
                )
        return gaps

    def check_format(self, prefer: str | None) -> str:
        """The image format to read: ``prefer`` if this source ships it, else the default."""
        if prefer is None:
            return self.image_formats[0]
        if prefer not in self.image_formats:
            raise MetadataError(
                f"--prefer {prefer}: {self.title} ships {list(self.image_formats)} images"
            )
        return prefer

    @abstractmethod
    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        """Read the metadata under the located ``root`` into a ``SourcePlan``: the views
        ``options.views`` selects (``keep_views``), read in the ``options.prefer`` image
        format (``check_format``) where the release ships several."""
