"""The parquet manifests of a built collection: schemas, fragment writing and reading.

Each table is a hive-partitioned parquet dataset ``OUT/manifests/<table>/source=<name>/``
with one fragment per shard, named after the shard. Building one source never touches
another source's partition, and a fragment is written whole (temporary file, then rename).
The ``source`` column comes from the partition path, not from the files.

Every fragment is read against its table's schema and must have exactly its columns, and a
source that ``build.json`` records under another ``SCHEMA_VERSION`` is refused: parquet would
read a column an older machex did not write as nulls, so old manifests would read as silently
empty values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from machex.records import FINDINGS
from machex.shards import unique_temporary

#: Bumped whenever a column is added, removed or changes meaning.
#: 2: ``reader_labels`` table; ``images.boxes_outside``; ``reports`` one row per study with
#:    its sections (was: one row per image, ``key, report``).
SCHEMA_VERSION = 2

IMAGES = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("view", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),  # path relative to OUT
        ("member", pa.string()),  # image member name inside the tar
        ("offset", pa.int64()),  # byte offset of the member's data in the tar
        ("size", pa.int64()),
        ("sha256", pa.string()),  # of the encoded image bytes
        ("encoding", pa.string()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("bits", pa.int8()),  # effective bit depth of the source pixels
        ("crop_x0", pa.float64()),  # crop window in original pixels
        ("crop_y0", pa.float64()),
        ("crop_x1", pa.float64()),
        ("crop_y1", pa.float64()),
        ("sex", pa.string()),
        ("age", pa.float32()),
        ("extras", pa.string()),  # JSON object of source-specific fields
        ("boxes_outside", pa.int32()),  # source boxes entirely outside the crop (not in bboxes)
    ]
)
LABELS = pa.schema(
    [("key", pa.string())]
    + [(finding, pa.int8()) for finding in FINDINGS]
    + [("native_labels", pa.list_(pa.string()))]
)
#: One row per study (join to ``images`` on ``source`` and ``study_id``).
REPORTS = pa.schema(
    [
        ("study_id", pa.string()),
        ("language", pa.string()),  # ISO 639-1: en, es
        ("text", pa.string()),  # the full report as released
        ("findings", pa.string()),
        ("impression", pa.string()),
        ("findings_impression", pa.string()),  # the clean conditioning text
        ("text_v1", pa.string()),  # the text the original MaCheX fed its report model
    ]
)
BBOXES = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),  # as the source spells it
        ("finding", pa.string()),  # unified finding (labels.csv), null if none
        ("x", pa.float64()),  # output (1024x1024) frame, clipped to it
        ("y", pa.float64()),
        ("width", pa.float64()),
        ("height", pa.float64()),
        ("clipped", pa.bool_()),
        ("orig_x", pa.float64()),  # as given by the source, in frame_width x frame_height
        ("orig_y", pa.float64()),
        ("orig_width", pa.float64()),
        ("orig_height", pa.float64()),
        ("frame_width", pa.int32()),
        ("frame_height", pa.int32()),
        ("reader", pa.string()),
    ]
)
READER_LABELS = pa.schema(
    [
        ("key", pa.string()),
        # One row per positive call: the reader marked the label present (images.extras
        # lists every reader of the image, so a missing row is a 0).
        ("reader", pa.string()),  # e.g. VinDr-CXR's R1..R17
        ("label", pa.string()),  # as the source spells it
        ("finding", pa.string()),  # unified finding (labels.csv), null if none
    ]
)
FAILURES = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("path", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "labels": LABELS,
    "reports": REPORTS,
    "bboxes": BBOXES,
    "reader_labels": READER_LABELS,
    "failures": FAILURES,
}
#: Written last for each shard: its presence marks the shard as finished. Every table's
#: fragment is written for every shard, empty or not.
COMMIT_TABLE = "images"


class ManifestError(ValueError):
    """A manifest fragment that cannot be read (truncated, not parquet); the message names
    the file and what to do, ``reason`` says what is wrong with it."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class SchemaMismatch(ManifestError):
    """Manifests written under another ``SCHEMA_VERSION`` (or with other columns); the
    message names the source and says to rebuild it."""


def partition_dir(out: Path, table: str, source: str) -> Path:
    return out / "manifests" / table / f"source={source}"


def fragment_path(out: Path, table: str, source: str, shard_stem: str) -> Path:
    return partition_dir(out, table, source) / f"{shard_stem}.parquet"


def write_fragment(path: Path, table: str, rows: Sequence[dict[str, object]]) -> None:
    """Write ``rows`` as one parquet file with the table's schema, atomically."""
    schema = TABLES[table]
    arrow = pa.Table.from_pylist(list(rows), schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(path)
    pq.write_table(arrow, tmp)
    os.replace(tmp, path)


def source_names(sources: str | Sequence[str]) -> list[str]:
    """``sources`` as a list of source names: one name alone becomes a list (a ``str`` is a
    sequence too, and ``in`` on it would match substrings), and aliases (``nih``,
    ``mimic-cxr``: the names ``--source`` accepts) become the name the build partitions by.
    A name that is no source's is kept as given, for the caller to report."""
    from machex.adapters import ADAPTERS, ALIASES  # lazy: imports every adapter module

    names = [sources] if isinstance(sources, str) else list(sources)
    resolved = []
    for name in names:
        key = name.strip().lower()
        key = ALIASES.get(key, key)
        resolved.append(key if key in ADAPTERS else name)
    return resolved


def built_sources(out: str | os.PathLike[str], table: str = "images") -> list[str]:
    """The sources with at least one fragment of ``table`` in the collection at ``out``."""
    folder = Path(out) / "manifests" / table
    if not folder.is_dir():
        return []
    return sorted(
        p.name.removeprefix("source=")
        for p in folder.glob("source=*")
        if p.is_dir() and any(p.glob("*.parquet"))
    )


def in_composition(frame: pd.DataFrame, pairs: Collection[tuple[str, str]]) -> pd.Series:
    """Which rows of a manifest ``frame`` (its ``source`` and ``split``) are in a
    composition's (source, split) ``pairs`` (``machex.tables.load_composition``)."""
    keys = pd.MultiIndex.from_frame(frame[["source", "split"]])
    return pd.Series(keys.isin(list(pairs)), index=frame.index)


#: What to do about manifests of another schema version.
REBUILD = "rebuild that source: machex build --source {source} --root ROOT --overwrite"


def _fingerprint_version(entry: object) -> object:
    """The ``schema_version`` of a ``build.json`` source entry's fingerprint (None if absent)."""
    for name in ("options", "fingerprint"):
        entry = entry.get(name) if isinstance(entry, dict) else None
    return entry.get("schema_version") if isinstance(entry, dict) else None


def check_schema_versions(out: str | os.PathLike[str], sources: Iterable[str] | None) -> None:
    """Raise ``SchemaMismatch`` for a source (of ``sources``; None: every recorded one) that
    ``build.json`` records as built under another ``SCHEMA_VERSION``. No or an unreadable
    ``build.json`` (a ``--part`` run, or a file ``machex stats`` reports) checks nothing here:
    each fragment's columns are still checked."""
    try:
        recorded = json.loads((Path(out) / "build.json").read_text()).get("sources")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(recorded, dict):
        return
    for source in sorted(recorded if sources is None else set(sources) & set(recorded)):
        version = _fingerprint_version(recorded[source])
        if version is not None and version != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"{Path(out) / 'build.json'}: source {source} was built under manifest schema "
                f"{version}, this machex reads schema {SCHEMA_VERSION}; "
                + REBUILD.format(source=source)
            )


def _check_columns(path: Path, table: str, found: Sequence[str]) -> None:
    expected = TABLES[table].names
    if sorted(found) == sorted(expected):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    source = path.parent.name.removeprefix("source=")
    raise SchemaMismatch(
        f"{path}: not the {table} columns of manifest schema {SCHEMA_VERSION} ("
        + "; ".join(
            f"{what}: {', '.join(names)}"
            for what, names in (("missing", missing), ("unexpected", extra))
            if names
        )
        + f"): written by another machex version; {REBUILD.format(source=source)}"
    )


def read_fragment(
    path: Path,
    table: str,
    columns: Sequence[str] | None = None,
    filters: list | None = None,
) -> pa.Table:
    """One fragment of ``table`` (only ``columns``, rows passing pyarrow ``filters``), typed
    as the current schema. Its columns must be the schema's (``SchemaMismatch``): read with
    ``schema=``, parquet would fill a column the fragment lacks with nulls. A truncated or
    damaged file raises ``ManifestError``."""
    path = Path(path)
    schema = TABLES[table]
    try:
        handle = pq.ParquetFile(path)  # the footer parsed once (685 fragments a table at scale)
        _check_columns(path, table, handle.schema_arrow.names)
        names = schema.names if columns is None else list(columns)
        if filters or not names:  # ParquetFile.read of no column gives no rows either
            return pq.read_table(path, schema=schema, columns=columns, filters=filters)
        read = handle.read(columns=names)
        return read.cast(pa.schema([schema.field(name) for name in names]))
    except (pa.ArrowException, OSError) as error:
        if filters and _readable(path, table):  # the filters are wrong, not the file
            raise ValueError(f"{table} filters {filters!r}: {error}") from None
        out = path.parents[3] if len(path.parents) > 3 else "OUT"  # OUT/manifests/<table>/source=
        raise ManifestError(
            f"{path}: unreadable manifest fragment ({error}); delete it and run the same "
            f"machex build again to rebuild shard {path.stem} (machex verify {out} lists any "
            "other)",
            reason=f"unreadable ({error})",
        ) from None


def _readable(path: Path, table: str) -> bool:
    try:
        pq.read_table(path, schema=TABLES[table])
    except (pa.ArrowException, OSError):
        return False
    return True


def _check_filters(table: str, filters: list | None) -> None:
    """Filters name columns of the table's files; ``source`` is the partition's (``sources=``)."""
    names = {str(term[0]) for term in _filter_terms(filters or [])}
    if "source" in names:
        raise ValueError("filters: select sources with sources=, not a filter on 'source'")
    _check_known(table, sorted(names), "filters name no column")


def _filter_terms(filters: list) -> list:
    """The (column, op, value) terms of pyarrow's list or list-of-lists (OR of ANDs) form."""
    return [t for item in filters for t in (item if isinstance(item, list) else [item])]


def _wanted_columns(table: str, columns: Sequence[str] | None) -> list[str] | None:
    """``columns`` without ``source`` (it comes from the partition), checked against the table."""
    if columns is None:
        return None
    wanted = [c for c in columns if c != "source"]
    _check_known(table, wanted, "has no column")
    return wanted


def _check_known(table: str, names: Iterable[str], what: str) -> None:
    """``ValueError`` (``"<table> <what> [unknown names]; its columns: [...]"``) for those of
    ``names`` (in their order) that are no column of ``table``'s files."""
    columns = TABLES[table].names
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(f"{table} {what} {unknown}; its columns: {columns}")


def load_manifest(
    out: str | os.PathLike[str],
    table: str,
    sources: str | Sequence[str] | None = None,
    *,
    shards: Collection[str] | None = None,
    columns: Sequence[str] | None = None,
    filters: list | None = None,
) -> pd.DataFrame:
    """One manifest table of a built collection as a DataFrame, with a ``source`` column;
    ``sources``: a name or a list (aliases accepted); ``shards``: only these shard stems'
    fragments (what one ``--part`` run wrote); ``columns``: only these (and ``source``), so
    that counting rows does not load every report's text; ``filters``: pyarrow row filters
    (``pq.read_table``), applied as each fragment is read.

    Empty (with the right columns) when nothing was built. Raises ``SchemaMismatch`` for a
    source built under another schema version and ``ManifestError`` for a damaged fragment.
    """
    if table not in TABLES:
        raise ValueError(f"unknown manifest table {table!r}; choose one of {list(TABLES)}")
    schema = TABLES[table]
    names = _wanted_columns(table, columns)
    _check_filters(table, filters)
    wanted = None if sources is None else set(source_names(sources))
    check_schema_versions(out, wanted)
    folder = Path(out) / "manifests" / table
    files = (
        sorted(
            p
            for p in folder.glob("source=*/*.parquet")
            if (wanted is None or p.parent.name.removeprefix("source=") in wanted)
            and (shards is None or p.stem in shards)
        )
        if folder.is_dir()
        else []
    )
    if not files:
        frame = schema.empty_table().select(schema.names if names is None else names).to_pandas()
        frame.insert(min(1, frame.shape[1]), "source", pd.Series(dtype=str))
        return frame
    tables = []
    for path in files:
        part = read_fragment(path, table, names, filters)
        source = path.parent.name.removeprefix("source=")
        column = pa.array([source] * part.num_rows, pa.string())
        tables.append(part.add_column(min(1, part.num_columns), "source", column))
    arrow = pa.concat_tables(tables)
    return arrow.to_pandas(types_mapper={pa.int8(): pd.Int8Dtype()}.get)
