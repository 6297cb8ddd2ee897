"""One shard of the plan, from its records to its files: the unit of work of every executor.

A shard is written tar first, then its manifest fragments, the ``images`` fragment last: its
presence marks the shard done. Every file is written to a private temporary name and renamed
into place, so a process killed mid-shard leaves no visible trace and loses only that shard.
``run_shard`` is what a Dask worker runs; the local executor processes the images of many
shards in parallel and calls ``write_shard`` itself: both write through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from machex.assemble import BuiltSample, build_in_worker, failure_row, report_row
from machex.imaging import PixelOptions
from machex.manifests import COMMIT_TABLE, TABLES, fragment_path, write_fragment
from machex.records import Failure, ImageRecord, ReportChoice
from machex.shards import ShardWriter


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: its file stem and its records, in key order."""

    stem: str
    split: str
    records: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to build one shard, and nothing more (it is pickled and
    sent to the worker): ``report_owners`` holds only this shard's report-owning keys."""

    out: Path
    source: str
    spec: ShardSpec
    pixels: PixelOptions
    root: Path
    report: ReportChoice
    report_owners: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ShardSummary:
    """What a finished shard reports back: small, whatever the shard's size."""

    stem: str
    records: int
    images: int
    failures: int


def shard_path(out: Path, source: str, stem: str) -> Path:
    return out / "shards" / source / f"{stem}.tar"


def is_shard_done(out: Path, source: str, stem: str) -> bool:
    """The images fragment is written last, after the tar (none when every image failed) and
    the other tables' fragments. A shard whose tar or any fragment has gone since (deleted by
    hand, lost with a disk) is not done: a resume rebuilds it, byte for byte, rather than
    calling the collection complete (a lost ``labels`` fragment would read as no labels)."""
    fragment = fragment_path(out, COMMIT_TABLE, source, stem)
    if not all(fragment_path(out, table, source, stem).is_file() for table in TABLES):
        return False
    tar = shard_path(out, source, stem)
    return tar.is_file() or pq.ParquetFile(fragment).metadata.num_rows == 0


def process_shard(task: ShardTask) -> list[BuiltSample | Failure]:
    """Every record of the shard through the image pipeline, in key order, in this process."""
    return [
        build_in_worker(record, task.pixels, task.root, task.report) for record in task.spec.records
    ]


def run_shard(task: ShardTask) -> ShardSummary:
    """Build one shard start to finish (what a Dask worker runs); safe to run again."""
    return write_shard(task.out, task.source, task.spec, process_shard(task), task.report_owners)


def write_shard(
    out: Path,
    source: str,
    spec: ShardSpec,
    samples: list[BuiltSample | Failure],
    report_owners: frozenset[str] = frozenset(),
) -> ShardSummary:
    """Tar first, then the fragments, the images fragment last (it marks the shard done).

    A study's report is written once, with the shard of its first record by key
    (``report_owners``), whether or not that image decoded: it describes the study."""
    built = [sample for sample in samples if isinstance(sample, BuiltSample)]
    tar = shard_path(out, source, spec.stem)
    rows: dict[str, list[dict[str, object]]] = {
        "images": _write_tar(tar, built, str(tar.relative_to(out))) if built else [],
        "labels": [sample.label_row for sample in built],
        "reports": [report_row(r) for r in spec.records if r.report and r.key in report_owners],
        "bboxes": [row for sample in built for row in sample.box_rows],
        "reader_labels": [row for sample in built for row in sample.reader_label_rows],
        "failures": [failure_row(f) for f in samples if isinstance(f, Failure)],
    }
    if not built:  # every image failed: no empty tar (WebDataset refuses those)
        tar.unlink(missing_ok=True)
    for table in sorted(TABLES, key=lambda t: t == COMMIT_TABLE):  # images last
        write_fragment(fragment_path(out, table, source, spec.stem), table, rows[table])
    return ShardSummary(spec.stem, len(spec.records), len(built), len(samples) - len(built))


def _write_tar(path: Path, built: list[BuiltSample], rel_path: str) -> list[dict[str, object]]:
    """Write the samples' image and JSON members; returns their ``images`` rows."""
    image_rows = []
    with ShardWriter(path) as writer:
        for sample in built:
            location = writer.add(sample.image_member, sample.image_bytes)
            writer.add(f"{sample.key}.json", sample.json_bytes)
            image_rows.append(sample.image_row | {"shard": rel_path, "offset": location.offset})
        writer.commit()
    return image_rows
