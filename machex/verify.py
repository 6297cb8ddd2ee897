"""Check a built collection against its manifests: every fragment, every image's bytes and
every tar's members.

Every manifest fragment is read once, whole: it must read as the current schema, and each
finished shard (one with an ``images`` fragment) must have a fragment of every table (all are
written for every shard, even empty) and a ``labels`` row for exactly its images (a lost
``labels`` fragment reads as no labels, not as an error). For each shard the tar headers are
streamed once (``tarfile`` iteration, no index scan per row) and compared with the ``images``
rows that name the shard: members missing, at another offset or size than the manifest says,
duplicated, or not in the manifest (an image member's ``<key>.json`` sibling is expected,
anything else is extra). Each ``<key>.json`` is parsed and must name its key and start right
after its image member, where ``MaCheX.read_json`` reads it. Every row's bytes are read at its
manifest ``offset``/``size`` and their sha256 recomputed. Rows whose shard file is gone, and
``.tar`` files under ``shards/`` that no row names, are reported too.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from machex.manifests import (
    COMMIT_TABLE,
    TABLES,
    ManifestError,
    SchemaMismatch,
    check_schema_versions,
    fragment_path,
    read_fragment,
)
from machex.shards import padded

#: Problem kinds, in the order they are listed.
KINDS = (
    "schema_mismatch",  # manifests of another schema version: rebuild the source
    "unreadable_fragment",  # a manifest fragment that cannot be read (truncated, not parquet)
    "missing_fragment",  # a finished shard without one of its tables' fragments
    "orphan_fragment",  # a fragment of a shard with no images fragment (unfinished or lost)
    "labels_mismatch",  # a shard's labels keys differ from its images keys
    "missing_shard",  # rows name a shard file that does not exist
    "unreadable_shard",  # the tar cannot be read (truncated, not a tar)
    "missing_member",  # a row's image member is not in its tar
    "location_mismatch",  # the member's header offset/size differ from the manifest's
    "hash_mismatch",  # the bytes at the manifest's offset/size do not hash to its sha256
    "truncated",  # the manifest's offset/size run past the end of the file
    "missing_json",  # an image member without its ``<key>.json`` sibling
    "bad_json",  # a ``<key>.json`` member that does not parse or names another key
    "misplaced_json",  # a ``<key>.json`` member not right after its image member
    "duplicate_member",  # a member name twice in one tar
    "extra_member",  # a member no row accounts for
    "unlisted_shard",  # a ``.tar`` under shards/ that no row names
)
CHUNK = 1 << 20
#: What a damaged or lost fragment needs (``is_shard_done`` wants every table's fragment).
REBUILD_SHARD = "run the same machex build again to rebuild the shard"
#: The images columns the checks use.
IMAGE_COLUMNS = ["key", "shard", "member", "offset", "size", "sha256"]


class NotACollection(ValueError):
    """The folder holds no built collection (no ``manifests/images``)."""


@dataclass(frozen=True)
class Problem:
    kind: str
    shard: str  # the file, relative to OUT: a shard, or a fragment or build.json (manifest kinds)
    member: str | None = None
    key: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = self.shard + (f" {self.member}" if self.member else "")
        who = f" (key {self.key})" if self.key else ""
        return f"{self.kind}: {where}{who}" + (f": {self.detail}" if self.detail else "")


@dataclass
class VerifyReport:
    out: Path
    shards: int = 0  # shard files named by the manifest
    images: int = 0  # images rows
    hashed: int = 0  # rows whose bytes were read and hashed
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        return {kind: counts[kind] for kind in KINDS if kind in counts}

    def to_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "ok": self.ok,
            "shards": self.shards,
            "images": self.images,
            "hashed": self.hashed,
            "bytes_read": self.bytes_read,
            "problem_counts": self.counts(),
            "problems": [asdict(p) for p in self.problems],
        }


def _sha256_at(handle, offset: int, size: int) -> str | None:
    """sha256 of ``size`` bytes at ``offset``, or None if the file ends first."""
    handle.seek(offset)
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            return None
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _fragments(out: Path, table: str) -> dict[tuple[str, str], Path]:
    """``(source, shard stem) -> path`` of every fragment of ``table``."""
    folder = out / "manifests" / table
    return {
        (path.parent.name.removeprefix("source="), path.stem): path
        for path in sorted(folder.glob("source=*/*.parquet"))
    }


def _read(out: Path, path: Path, table: str, report: VerifyReport) -> pa.Table | None:
    """The whole fragment (every column decoded once), or None with the problem reported."""
    try:
        return read_fragment(path, table)
    except ManifestError as error:
        if isinstance(error, SchemaMismatch):
            kind, detail = "schema_mismatch", str(error).removeprefix(f"{path}: ")
        else:
            kind, detail = "unreadable_fragment", f"{error.reason}; delete it and {REBUILD_SHARD}"
        report.problems.append(Problem(kind, path.relative_to(out).as_posix(), detail=detail))
        return None


def _check_labels(rel: str, images: pa.Table, labels: pa.Table, report: VerifyReport) -> None:
    """A labels row for each image and none other: the dataset reads a missing one as NaN."""
    image_keys = set(images.column("key").to_pylist())
    label_keys = set(labels.column("key").to_pylist())
    unlabelled, stray = sorted(image_keys - label_keys), sorted(label_keys - image_keys)
    if unlabelled or stray:
        first = (unlabelled or stray)[0]
        report.problems.append(
            Problem(
                "labels_mismatch",
                rel,
                key=first,
                detail=f"{len(unlabelled)} images rows without a labels row, {len(stray)} labels "
                f"rows of no image (first {first}); delete this fragment and {REBUILD_SHARD}",
            )
        )


def _check_finished_shard(
    out: Path, key: tuple[str, str], fragments: dict, report: VerifyReport
) -> pa.Table | None:
    """Read each table's fragment of one finished shard; its ``images`` table, if readable."""
    read = {}
    for table in TABLES:
        path = fragments[table].get(key)
        if path is None:
            rel = fragment_path(out, table, *key).relative_to(out).as_posix()
            detail = f"every shard has a {table} fragment; {REBUILD_SHARD}"
            report.problems.append(Problem("missing_fragment", rel, detail=detail))
        else:
            read[table] = _read(out, path, table, report)
    images, labels = read.get(COMMIT_TABLE), read.get("labels")
    if images is not None and labels is not None:
        rel = fragments["labels"][key].relative_to(out).as_posix()
        _check_labels(rel, images, labels, report)
    return images


def _check_manifests(out: Path, report: VerifyReport) -> pd.DataFrame:
    """Check every fragment of every table; returns the ``images`` rows that could be read."""
    try:
        check_schema_versions(out, None)
    except SchemaMismatch as error:
        detail = str(error).removeprefix(f"{out / 'build.json'}: ")
        report.problems.append(Problem("schema_mismatch", "build.json", detail=detail))
    fragments = {table: _fragments(out, table) for table in TABLES}
    finished = fragments[COMMIT_TABLE]
    images = []
    for key in sorted(finished):
        table = _check_finished_shard(out, key, fragments, report)
        if table is not None:
            images.append(table.select(IMAGE_COLUMNS))
    for paths in fragments.values():
        for key, path in sorted(paths.items()):
            if key not in finished:
                detail = f"shard {key[1]} has no {COMMIT_TABLE} fragment (unfinished or lost); "
                rel = path.relative_to(out).as_posix()
                report.problems.append(
                    Problem("orphan_fragment", rel, detail=detail + REBUILD_SHARD)
                )
    if not images:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in IMAGE_COLUMNS})
    return pa.concat_tables(images).to_pandas()


def _check_json(
    tar: tarfile.TarFile, info: tarfile.TarInfo, shard: str, row, located: bool
) -> Problem | None:
    """The ``<key>.json`` member must parse, name its key and, where its image member is where
    the manifest says (``located``), start right after it: ``MaCheX.read_json`` reads the
    header at the image's offset + padded size and fails on anything else."""
    expected = int(row.offset) + padded(int(row.size))
    if located and info.offset != expected:
        detail = f"header at offset {info.offset}, expected {expected} (right after the image)"
        return Problem("misplaced_json", shard, info.name, row.key, detail)
    handle = tar.extractfile(info)
    try:
        sample = json.loads(handle.read() if handle else b"")
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        return Problem("bad_json", shard, info.name, row.key, f"not JSON: {error}")
    found = sample.get("key") if isinstance(sample, dict) else None
    if found != row.key:
        return Problem("bad_json", shard, info.name, row.key, f"its key is {found!r}")
    return None


def _check_shard(out: Path, shard: str, rows: list, report: VerifyReport) -> None:
    """Compare one tar with its rows (``itertuples`` of the images table)."""
    path = out / shard
    by_member = {row.member: row for row in rows}
    expected_json = {f"{row.key}.json": row for row in rows}
    seen: set[str] = set()
    located: set[str] = set()  # keys whose image member is where the manifest says
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # lazy: headers only, data skipped (but the small JSON members)
                name = info.name
                if name in seen:
                    report.problems.append(Problem("duplicate_member", shard, name))
                    continue
                seen.add(name)
                row = by_member.get(name)
                if row is not None:
                    if (info.offset_data, info.size) == (row.offset, row.size):
                        located.add(row.key)
                    else:
                        report.problems.append(
                            Problem(
                                "location_mismatch",
                                shard,
                                name,
                                row.key,
                                f"tar header: offset {info.offset_data} size {info.size}; "
                                f"manifest: offset {row.offset} size {row.size}",
                            )
                        )
                elif name in expected_json:
                    row = expected_json[name]
                    problem = _check_json(tar, info, shard, row, row.key in located)
                    if problem is not None:
                        report.problems.append(problem)
                else:
                    report.problems.append(Problem("extra_member", shard, name))
    except (tarfile.TarError, OSError, EOFError) as error:
        report.problems.append(Problem("unreadable_shard", shard, detail=str(error)))
    for member, row in by_member.items():
        if member not in seen:
            report.problems.append(Problem("missing_member", shard, member, row.key))
    for member, row in expected_json.items():
        if member not in seen and row.member in seen:
            report.problems.append(Problem("missing_json", shard, member, row.key))


def _hash_rows(path: Path, shard: str, rows: list, report: VerifyReport, on_advance) -> None:
    """Re-hash each row's bytes at its manifest offset/size."""
    with open(path, "rb") as handle:
        for row in rows:
            digest = _sha256_at(handle, int(row.offset), int(row.size))
            if digest is None:
                report.problems.append(
                    Problem(
                        "truncated",
                        shard,
                        row.member,
                        row.key,
                        f"offset {row.offset} + size {row.size} past the end of the file",
                    )
                )
            else:
                report.hashed += 1
                report.bytes_read += int(row.size)
                if digest != row.sha256:
                    report.problems.append(
                        Problem(
                            "hash_mismatch",
                            shard,
                            row.member,
                            row.key,
                            f"sha256 {digest}, manifest {row.sha256}",
                        )
                    )
            if on_advance:
                on_advance(1)


def verify_collection(
    out: Path,
    on_advance: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every manifest fragment, shard and image of the collection in ``out``;
    ``on_start(total)`` is called once the manifests are read (``total``: the ``images`` rows
    to hash) and ``on_advance(n)`` as rows are hashed (for a progress bar)."""
    out = Path(out)
    if not (out / "manifests" / "images").is_dir():
        raise NotACollection(f"{out} holds no MaCheX build (no manifests/images/)")
    report = VerifyReport(out=out)
    images = _check_manifests(out, report)
    report.images = len(images)
    if on_start:
        on_start(len(images))
    named = set()
    for shard, group in images.sort_values(["shard", "offset"]).groupby("shard", sort=True):
        named.add(shard)
        report.shards += 1
        path = out / shard
        if not path.is_file():
            report.problems.append(
                Problem("missing_shard", shard, detail=f"named by {len(group)} images rows")
            )
            if on_advance:
                on_advance(len(group))
            continue
        rows = list(group.itertuples(index=False))
        _check_shard(out, shard, rows, report)
        _hash_rows(path, shard, rows, report, on_advance)
    shards_dir = out / "shards"
    if shards_dir.is_dir():
        for tar in sorted(shards_dir.rglob("*.tar")):
            rel = tar.relative_to(out).as_posix()
            if rel not in named:
                report.problems.append(
                    Problem("unlisted_shard", rel, detail="no images row names this shard")
                )
    order = {kind: i for i, kind in enumerate(KINDS)}
    report.problems.sort(key=lambda p: (order[p.kind], p.shard, p.member or ""))
    return report
