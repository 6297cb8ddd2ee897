"""The parquet manifests of a built collection: schemas, fragment writing and reading.

Each table is a hive-partitioned parquet dataset ``OUT/manifests/<table>/source=<name>/``
with one fragment per shard, named after the shard. Building one source never touches
another source's partition, and a fragment is written whole (temporary file, then rename).
The ``source`` column comes from the partition path, not from the files.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
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
#: Written last for each shard: its presence marks the shard as finished.
COMMIT_TABLE = "images"


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


def load_manifest(
    out: str | os.PathLike[str],
    table: str,
    sources: str | Sequence[str] | None = None,
    *,
    shards: Collection[str] | None = None,
) -> pd.DataFrame:
    """One manifest table of a built collection as a DataFrame, with a ``source`` column;
    ``sources``: a name or a list (aliases accepted); ``shards``: only these shard stems'
    fragments (what one ``--part`` run wrote).

    Empty (with the right columns) when nothing was built.
    """
    if table not in TABLES:
        raise ValueError(f"unknown manifest table {table!r}; choose one of {list(TABLES)}")
    schema = TABLES[table]
    wanted = None if sources is None else set(source_names(sources))
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
        frame = schema.empty_table().to_pandas()
        frame.insert(1, "source", pd.Series(dtype=str))
        return frame
    tables = []
    for path in files:
        part = pq.read_table(path, schema=schema)
        source = path.parent.name.removeprefix("source=")
        tables.append(part.add_column(1, "source", pa.array([source] * part.num_rows, pa.string())))
    arrow = pa.concat_tables(tables)
    return arrow.to_pandas(types_mapper={pa.int8(): pd.Int8Dtype()}.get)
