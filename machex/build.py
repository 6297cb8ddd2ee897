"""The one orchestrator: adapter -> records -> image pipeline -> shards -> manifests.

Work is cut into shards fixed by the plan alone (records sorted by key, ``shard_size`` per
shard, per split), so the output does not depend on ``--workers`` and a shard is the unit of
resumption: a shard counts as done once its ``images`` fragment exists, which is written
after the tar and the other fragments. Killing the build at any point and running it again
redoes at most the shard that was in flight.

The shards run on an executor (``machex.executors``: this machine, or a Dask cluster), and
``--part I/N`` builds every N-th shard only (``machex.parts``; ``machex.merge`` joins them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from machex import __version__
from machex.adapters import MetadataError, SourceAdapter, SourcePlan, get_adapter
from machex.adapters.base import DEFAULT_PLAN, PlanOptions
from machex.assemble import DEFAULT_REPORT_CHOICE
from machex.executors import LocalExecutor, ShardExecutor
from machex.imaging import PixelOptions
from machex.manifests import (
    COMMIT_TABLE,
    SCHEMA_VERSION,
    TABLES,
    fragment_path,
    load_manifest,
    partition_dir,
)
from machex.parts import Part, part_dir, part_file, read_part_records, write_part_record
from machex.records import ImageRecord, ReportChoice
from machex.shards import remove_stale_temporaries
from machex.shardwork import ShardSpec, ShardTask, is_shard_done, write_shard
from machex.shardwork import shard_path as shard_path  # re-exported: it lived here before
from machex.tables import DEFAULT_VIEWS, ViewSelection, load_source_tables

log = logging.getLogger(__name__)

_write_shard = write_shard  # the old private name (tests/test_dicom.py writes a probe shard)

BUILD_FILE = "build.json"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_FAILURE_RATE = 0.01


class BuildError(RuntimeError):
    """The build cannot start or continue as asked (exit code 2); says what to do."""


@dataclass(frozen=True)
class BuildOptions:
    """How to build one source. ``pixels`` and ``shard_size`` decide the output bytes;
    ``workers`` and ``max_failure_rate`` do not."""

    pixels: PixelOptions = field(default_factory=PixelOptions)
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = -1  # joblib convention: -1 = all cores
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    prefer: str | None = None  # image format where a source ships several (--prefer)
    views: ViewSelection = DEFAULT_VIEWS  # --views; the default is the paper's frontal set
    report: ReportChoice = DEFAULT_REPORT_CHOICE  # --report-text, --report-languages
    reports: Path | None = None  # --reports: a source's reports outside its root

    @property
    def plan_options(self) -> PlanOptions:
        return PlanOptions(self.prefer, self.views, self.reports)

    def output_fingerprint(self) -> dict[str, object]:
        return (
            {
                "encoding": self.pixels.encoding.value,
                "intensity": self.pixels.intensity.value,
                "compat": self.pixels.compat,
                "image_size": self.pixels.image_size,
                "max_pixels": self.pixels.max_pixels,
                "shard_size": self.shard_size,
                "schema_version": SCHEMA_VERSION,
            }
            | ({"prefer": self.prefer} if self.prefer else {})
            | ({"views": self.views.spec} if self.views != DEFAULT_VIEWS else {})
            | ({"report": self.report.as_dict()} if self.report != DEFAULT_REPORT_CHOICE else {})
            | ({"reports": str(self.reports)} if self.reports else {})
        )


@dataclass
class SourceResult:
    """What a build of one source (or of one ``part`` of it, then counting that part's shards
    only) did; ``status`` is ``built``, ``up_to_date``."""

    source: str
    status: str
    to_build: int
    built: int
    failed: int
    shards: int
    shards_written: int
    summary: dict[str, object]
    boxes: int = 0  # rows in bboxes
    boxes_outside: int = 0  # source boxes entirely outside the centre crop, dropped
    part: str | None = None  # "I/N" for a --part run

    @property
    def failure_rate(self) -> float:
        return self.failed / self.to_build if self.to_build else 0.0

    def to_dict(self) -> dict[str, object]:
        """The counts, JSON-ready: what build.json and ``--json`` record."""
        summary = self.summary
        return {
            "status": self.status,
            "planned": summary["planned"],
            "to_build": self.to_build,
            "built": self.built,
            "failed": self.failed,
            "failure_rate": self.failure_rate,
            "shards": self.shards,
            "shards_written": self.shards_written,
            "by_split": summary["by_split"],
            "by_view": summary["by_view"],
            "skipped": summary["skipped"],
            "known_bad": summary["known_bad"],
            "missing_files": summary["missing_files"],
            "studies": summary["studies"],
            "reports": summary["reports"],
            "boxes": self.boxes,
            "boxes_outside_crop": self.boxes_outside,
            "warnings": summary["warnings"],
        } | (
            ({"path_rules": summary["path_rules"]} if "path_rules" in summary else {})
            | ({"part": self.part} if self.part else {})
        )


@dataclass
class ProgressHooks:
    """Callbacks for a progress display; the library itself never prints."""

    on_start: Callable[[str, int, int], None] = lambda source, total, done: None
    on_advance: Callable[[int], None] = lambda n: None


def check_options(options: BuildOptions) -> None:
    """Reject options that cannot work, before any file is read."""
    if options.workers == 0:
        raise BuildError("--workers must be a positive count or -1 (all cores), not 0")
    if not 0 <= options.max_failure_rate <= 1:
        raise BuildError(f"--max-failure-rate must be in [0, 1], got {options.max_failure_rate}")
    if options.shard_size < 1:
        raise BuildError(f"--shard-size must be at least 1, got {options.shard_size}")


def check_modes(*, overwrite: bool, part: Part | None, retry_failed: bool) -> None:
    """Refuse ``--overwrite``, ``--part`` and ``--retry-failed`` together (checked before a
    cluster is started, and again by ``build_source``)."""
    if part is not None and overwrite:
        raise BuildError(
            f"--overwrite cannot be combined with --part {part.label}: parts run at the same "
            "time and would delete each other's shards; build once with --overwrite and "
            "without --part, or delete the source's output before starting the parts"
        )
    if retry_failed and (part is not None or overwrite):
        other = "--overwrite (which rebuilds everything)" if overwrite else "--part"
        raise BuildError(
            f"--retry-failed cannot be combined with {other}; retry once the build is whole "
            "(after `machex merge` for part builds)"
        )


def plan_source(name: str, root: Path, options: PlanOptions = DEFAULT_PLAN) -> SourcePlan:
    """Read a source's metadata into a plan (no pixel is read), with the user's choice of
    image format and views (``PlanOptions``)."""
    adapter: SourceAdapter = get_adapter(name)
    adapter.check_format(options.prefer)
    if options.reports is not None and not adapter.separate_reports:
        raise MetadataError(
            f"--reports {options.reports}: {adapter.title} has no separately shipped reports"
        )
    located = adapter.locate_root(Path(root))
    return adapter.plan(located, load_source_tables(adapter.name), options)


def _missing(plan: SourcePlan) -> tuple[int, str]:
    """How many listed images are not on disk, and where the first was expected."""
    missing = [record for record in plan.records if record.path is None]
    example = str(Path(plan.root) / missing[0].source_key) if missing else ""
    return len(missing), example


def missing_images_warning(plan: SourcePlan) -> str | None:
    """The dry run's warning when most listed images are not on disk: a wrong --root, or a
    release whose images were not downloaded (only its metadata)."""
    count, example = _missing(plan)
    if count * 2 <= len(plan.records):
        return None
    return (
        f"{count:,} of the {len(plan.records):,} listed images are not under {plan.root} "
        f"(e.g. {example}); is --root the folder that holds the images?"
    )


def check_images_present(plan: SourcePlan) -> None:
    """Refuse, before anything is written, a build in which no listed image is on disk: it
    would only mark the source complete with 0 images."""
    count, example = _missing(plan)
    if plan.records and count == len(plan.records):
        raise BuildError(
            f"none of the {count:,} images listed for {plan.source} is under {plan.root} "
            f"(e.g. {example}); download the images, or point --root at the folder that "
            "holds them"
        )


def shard_specs(plan: SourcePlan, shard_size: int) -> list[ShardSpec]:
    """Cut the plan into shards: per split, consecutive runs of ``shard_size`` keys."""
    by_split: dict[str, list[ImageRecord]] = {}
    for record in plan.records:  # already sorted by key
        by_split.setdefault(record.split, []).append(record)
    specs = []
    for split in sorted(by_split):
        records = by_split[split]
        for index, start in enumerate(range(0, len(records), shard_size)):
            stem = f"{plan.source}-{split}-{index:06d}"
            specs.append(ShardSpec(stem, split, tuple(records[start : start + shard_size])))
    return specs


def plan_fingerprints(specs: list[ShardSpec]) -> tuple[str, dict[str, str]]:
    """Hash of the shard layout and every record's content (labels, ages, boxes, paths...):
    a resume must see exactly the plan the finished shards were built from. With it, the
    same hash per shard (16 hex digits): which shards a changed plan touches, so that
    ``--retry-failed`` may accept changes confined to the shards it rebuilds. One pass: the
    records' ``repr`` is most of the cost (seconds for a large source)."""
    whole = hashlib.sha256()
    shards = {}
    for spec in specs:
        whole.update(spec.stem.encode())
        digest = hashlib.sha256()
        for record in spec.records:
            text = b"\0" + repr(record).encode()
            whole.update(text)
            digest.update(text)
        shards[spec.stem] = digest.hexdigest()[:16]
    return whole.hexdigest(), shards


def failed_shards(out: Path, source: str) -> frozenset[str]:
    """The stems of the source's shards whose ``failures`` fragment has a row."""
    folder = partition_dir(out, "failures", source)
    return frozenset(
        fragment.stem
        for fragment in folder.glob("*.parquet")
        if pq.read_metadata(fragment).num_rows
    )


def changes_within(previous: dict, entry: dict, stems: frozenset[str]) -> bool:
    """Whether ``entry``'s plan differs from ``previous``'s only inside ``stems`` (same
    shards; False where ``previous`` predates per-shard fingerprints)."""
    old, new = previous.get("shard_fingerprints"), entry.get("shard_fingerprints")
    if not isinstance(old, dict) or not isinstance(new, dict) or old.keys() != new.keys():
        return False
    return all(stem in stems for stem in new if old[stem] != new[stem])


def report_owners(records: list[ImageRecord]) -> frozenset[str]:
    """Keys of the first record (by key) of each study that has a report."""
    first: dict[str, str] = {}
    for record in records:
        if record.report is not None:
            study = record.report.study_id
            if study not in first or record.key < first[study]:
                first[study] = record.key
    return frozenset(first.values())


def build_source(
    name: str,
    root: Path,
    out: Path,
    options: BuildOptions = BuildOptions(),
    *,
    overwrite: bool = False,
    hooks: ProgressHooks | None = None,
    plan: SourcePlan | None = None,
    executor: ShardExecutor | None = None,
    part: Part | None = None,
    retry_failed: bool = False,
) -> SourceResult:
    """Build (or resume, or confirm) one source into ``out``; ``plan`` if it was already
    made with these options (``plan_source``). ``executor`` runs the shards (default: joblib
    with ``options.workers``); ``part`` builds only that part's shards and records it in
    ``OUT/.parts/`` instead of ``build.json`` (``machex.merge.merge_parts`` finishes).
    ``retry_failed`` also rebuilds the finished shards that hold a failed image (after the
    bad files were replaced or downloaded; plan changes inside those shards are accepted)."""
    hooks = hooks or ProgressHooks()
    # Absolute: the shard tasks may run on cluster workers started in other folders.
    out = Path(out).absolute()
    check_options(options)
    check_modes(overwrite=overwrite, part=part, retry_failed=retry_failed)
    plan = plan or plan_source(name, root, options.plan_options)
    check_images_present(plan)
    source = plan.source
    specs = shard_specs(plan, options.shard_size)
    mine = specs if part is None else part.select(specs)
    executor = executor or LocalExecutor(options.workers)
    entry = {
        "root": str(plan.root),
        # The data-use terms travel with the build: shards derived from credentialed
        # sources (PhysioNet, Stanford, BIMCV) must not be redistributed.
        "licence": get_adapter(source).licence,
        "options": _options_record(options, executor.workers_used()),
        "status": "in_progress",
    }
    entry["plan_fingerprint"], entry["shard_fingerprints"] = plan_fingerprints(specs)
    prepare_out(out)

    with source_lock(out, source, shared=part is not None), _part_lock(out, source, part):
        if overwrite:
            remove_source(out, source)
            previous, parts = None, {}
        else:
            retry = failed_shards(out, source) if retry_failed else frozenset()
            previous, parts = _check_resume(out, source, entry, part, specs, retry)
            if retry:
                # The shards are marked undone before build.json takes the new plan (below):
                # killed in between, a plain re-run sees the old plan and points here again.
                # Meanwhile the source is in progress, never "complete" with shards missing.
                if previous is not None:
                    update_build_file(out, source, previous | {"status": "in_progress"})
                log.info("%s: rebuilding the %d shards with failed images", source, len(retry))
                for stem in sorted(retry):
                    fragment_path(out, COMMIT_TABLE, source, stem).unlink(missing_ok=True)
        _remove_temporaries(out, source, None if part is None else mine)

        todo = [s for s in mine if not is_shard_done(out, source, s.stem)]
        summary = plan.summary()
        if part is None:
            if not todo and previous is not None and previous.get("status") == "complete":
                log.info("%s: already complete in %s, nothing to do", source, out)
                if "shard_fingerprints" not in previous:  # written before they existed
                    hashes = {"shard_fingerprints": entry["shard_fingerprints"]}  # plan matched
                    update_build_file(out, source, previous | hashes)
                return source_result(out, source, summary, status="up_to_date", shards=specs)
            update_build_file(out, source, entry)
        else:
            if not todo and parts.get(part, {}).get("status") == "complete":
                return source_result(
                    out, source, summary, status="up_to_date", shards=mine, part=part
                )
            write_part_record(out, source, part, _part_record(entry, part, specs, mine, summary))

        total = sum(len(s.records) for s in mine)
        remaining = sum(len(s.records) for s in todo)
        label = source if part is None else f"{source} {part.label}"
        hooks.on_start(label, total, total - remaining)
        owners = report_owners(plan.records)
        tasks = [
            ShardTask(
                out,
                source,
                spec,
                options.pixels,
                plan.root,
                options.report,
                frozenset(r.key for r in spec.records if r.key in owners),
            )
            for spec in todo
        ]
        try:
            for _ in executor.run(tasks, hooks.on_advance):
                pass
        finally:
            # What workers lost mid-shard left behind (their shards were redone).
            _remove_temporaries(out, source, None if part is None else mine)
        lost = [s.stem for s in todo if not is_shard_done(out, source, s.stem)]
        if lost:  # e.g. a worker that wrote elsewhere: never call such a build complete
            raise BuildError(
                f"{source}: {len(lost)} shard(s) reported built are not in {out} (e.g. "
                f"{lost[0]}); do the workers see {out} at that path? Run the same command "
                "again once they do"
            )

        if part is not None:
            result = source_result(
                out,
                source,
                summary,
                status="built",
                shards=mine,
                shards_written=len(todo),
                part=part,
            )
            record = _part_record(entry, part, specs, mine, summary, shards_written=len(todo))
            write_part_record(out, source, part, record | {"status": "complete"})
            return result
        result = source_result(
            out, source, summary, status="built", shards=specs, shards_written=len(todo)
        )
        counts = result.to_dict() | {"status": "complete", "finished": utc_now()}
        update_build_file(out, source, entry | counts)
        # A whole build supersedes any part runs of the source: nothing is left to merge.
        shutil.rmtree(part_dir(out, source), ignore_errors=True)
        remove_empty_folder(part_dir(out, source).parent)
        return result


def _check_resume(
    out: Path,
    source: str,
    entry: dict,
    part: Part | None,
    specs: list[ShardSpec],
    retry: frozenset[str] = frozenset(),
) -> tuple[dict | None, dict[Part, dict]]:
    """Check ``entry`` against build.json's record of the source and every part record;
    returns them. A plan changed only inside the ``retry`` shards passes."""
    # Shards first, then the part records: a part writes its record before any shard, so a
    # shard seen here has its record seen below even while other parts are starting.
    has_shards = any((out / "shards" / source).glob("*.tar"))
    previous = read_build_file(out).get("sources", {}).get(source)
    parts = read_part_records(out, source)
    # --part refuses --overwrite: advise what works there.
    rebuild = (
        "add --overwrite to rebuild"
        if part is None
        else "build the parts into a new --out (--part cannot be combined with --overwrite)"
    )

    def check(record: dict, where: str) -> None:
        advice = rebuild
        changed = record.get("plan_fingerprint") != entry["plan_fingerprint"]
        if changed and retry and changes_within(record, entry, retry):
            record = record | {"plan_fingerprint": entry["plan_fingerprint"]}
        elif changed and part is None and changes_within(record, entry, failed_shards(out, source)):
            advice = (
                f"add --retry-failed to rebuild just the shards with failed images, or {rebuild}"
            )
        elif changed and retry and "shard_fingerprints" not in record:
            advice = (
                f"--retry-failed cannot tell which shards changed: {where} was recorded before "
                "machex kept a hash per shard (one plain run with the files as they were "
                f"records them); {rebuild}"
            )
        check_compatible(
            record,
            entry,
            source,
            where,
            rebuild=advice,
            plan_changes=lambda: describe_plan_changes(out, source, specs),
        )

    if previous is not None:
        check(previous, f"{source} in this folder")
    for other, record in parts.items():
        where = f"part {other.label} of {source} ({part_file(out, source, other)})"
        if part is not None and other.count != part.count:
            raise BuildError(
                f"{where} belongs to a {other.count}-way split, not {part.count}; use "
                f"--part I/{other.count}, or build the {part.count}-way split into a new --out"
            )
        check(record.get("entry", {}), where)
    if previous is None and not parts and has_shards:
        raise BuildError(
            f"{out} holds shards of {source} but build.json has no record of how "
            f"they were built; {rebuild}"
        )
    return previous, parts


def _part_record(
    entry: dict,
    part: Part,
    specs: list[ShardSpec],
    mine: list[ShardSpec],
    summary: dict[str, object],
    *,
    shards_written: int = 0,
) -> dict[str, object]:
    """What ``machex merge`` needs to write build.json without the source's metadata."""
    return {
        "part": part.index,
        "parts": part.count,
        "status": "in_progress",
        "entry": {k: v for k, v in entry.items() if k != "status"},
        "summary": summary,
        "shards_planned": len(specs),
        "shards": [spec.stem for spec in mine],
        "shards_written": shards_written,
        "updated": utc_now(),
    }


def _remove_temporaries(out: Path, source: str, specs: list[ShardSpec] | None) -> None:
    """Leftovers of killed writers: all of the source's, or only these shards' (a part run
    must not delete the files another part is writing)."""
    folders = (out / "shards" / source, *(partition_dir(out, t, source) for t in TABLES))
    for folder in folders:
        if specs is None:
            remove_stale_temporaries(folder)
        else:
            for spec in specs:
                remove_stale_temporaries(folder, spec.stem)


def remove_empty_folder(folder: Path) -> None:
    """Remove ``folder`` if it is empty (``OUT/.parts`` once its last source is done)."""
    with suppress(OSError):  # absent, or holds another source's parts
        folder.rmdir()


def source_result(
    out: Path,
    source: str,
    summary: dict[str, object],
    *,
    status: str,
    shards: list[ShardSpec],
    shards_written: int = 0,
    part: Part | None = None,
) -> SourceResult:
    """Counts read back from the fragments: the whole source's, or with ``part`` only its
    ``shards``' (other parts may be writing theirs)."""
    stems = None if part is None else {spec.stem for spec in shards}
    images = load_manifest(out, "images", [source], shards=stems)
    return SourceResult(
        source,
        status,
        sum(len(s.records) for s in shards) if part is not None else int(summary["to_build"]),
        len(images),
        len(load_manifest(out, "failures", [source], shards=stems)),
        len(shards),
        shards_written,
        summary,
        boxes=len(load_manifest(out, "bboxes", [source], shards=stems)),
        boxes_outside=int(images["boxes_outside"].fillna(0).sum()),
        part=None if part is None else part.label,
    )


def _options_record(options: BuildOptions, workers_used: int) -> dict[str, object]:
    record = asdict(options)
    record["views"] = options.views.spec
    record["reports"] = str(options.reports) if options.reports else None
    record["report"] = options.report.as_dict()
    record["pixels"]["encoding"] = options.pixels.encoding.value
    record["pixels"]["intensity"] = options.pixels.intensity.value
    # Not in the fingerprint: both decoders give the same pixels (machex.imaging.png).
    decoder = options.pixels.png_decoder
    record["pixels"]["png_decoder"] = decoder.value
    record["pixels"]["png_decoder_here"] = "imagecodecs" if decoder.use_imagecodecs() else "pillow"
    return record | {"workers_used": workers_used, "fingerprint": options.output_fingerprint()}


def check_compatible(
    previous: dict,
    entry: dict,
    source: str,
    where: str,
    *,
    rebuild: str = "rebuild with `machex build ... --overwrite`",
    plan_changes: Callable[[], str] | None = None,
) -> None:
    """A resume (or a part, or a merge) must see the root, output options and plan that
    ``previous`` (a build.json entry or a part record's, described by ``where``) was made
    with. ``rebuild``: advice that works for the command at hand (the default suits any,
    ``machex merge`` included); ``plan_changes``: says which records differ (read from the
    finished shards, only once the plan is known to have changed)."""
    root = entry.get("root")
    if previous.get("root") not in (None, root):
        raise BuildError(
            f"{where} was built from {previous['root']}, not {root}; "
            f"use the same --root to resume, or {rebuild}"
        )
    old = _json(previous.get("options", {}).get("fingerprint"))
    new = _json(entry.get("options", {}).get("fingerprint"))
    if old != new:
        raise BuildError(
            f"{where} was built with other options ({option_changes(old, new)}); "
            f"re-run with the same options to resume, or {rebuild}"
        )
    if previous.get("plan_fingerprint") != entry.get("plan_fingerprint"):
        changes = f": {plan_changes()}" if plan_changes else ""
        raise BuildError(
            f"the metadata of {source} changed since {where} was started (different images "
            f"or shard layout{changes}); {rebuild}"
        )


def option_changes(old: object, new: object) -> str:
    """``shard_size: 4 -> 5, encoding: jpeg -> png``: the output options that differ, as
    then -> now (``default`` where one side does not record the option)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{old} -> {new}"
    changed = [k for k in [*old, *(k for k in new if k not in old)] if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k, 'default')} -> {new.get(k, 'default')}" for k in changed)


#: Record fields kept verbatim in the images (and failures) manifests, compared on a resume
#: whose plan changed; ``sex`` and ``age`` only where the record has them (else the image
#: header may have filled them in).
_COMPARED = ("source_key", "split", "view", "patient_id", "study_id", "sex", "age")


def describe_plan_changes(out: Path, source: str, specs: list[ShardSpec]) -> str:
    """How many records of the finished shards differ from the new plan, and the first (by
    key) with what changed: read back from their manifest fragments."""
    built: dict[str, dict[str, object]] = {}
    for table, columns in (("images", _COMPARED), ("failures", ("source_key", "error_type"))):
        for fragment in sorted(partition_dir(out, table, source).glob("*.parquet")):
            if not is_shard_done(out, source, fragment.stem):
                continue
            rows = pq.read_table(fragment, columns=["key", *columns]).to_pylist()
            built.update({row.pop("key"): row | {"shard": fragment.stem} for row in rows})
    finished = {str(row["shard"]) for row in built.values()}
    if not finished:
        return "no finished shard to compare with"
    planned = {record.key: (spec.stem, record) for spec in specs for record in spec.records}
    differences: dict[str, str] = {}
    for key in sorted(built.keys() | {k for k, (s, _) in planned.items() if s in finished}):
        row = built.get(key)
        if key not in planned:
            differences[key] = f"built in {row['shard']}, not in the plan any more"
        elif row is None:
            differences[key] = f"new in the plan's {planned[key][0]}"
        else:
            stem, record = planned[key]
            changed = [("shard", row["shard"], stem)] + [
                (name, row[name], getattr(record, name))
                for name in _COMPARED
                if name in row and not (name in ("sex", "age") and getattr(record, name) is None)
            ]
            changed = [(n, a, b) for n, a, b in changed if _differs(a, b)]
            if row.get("error_type") == "FileNotFoundError" and record.path is not None:
                changed.append(("file", "missing", "on disk"))
            if changed:
                differences[key] = ", ".join(f"{n} {_show(a)} -> {_show(b)}" for n, a, b in changed)
    if not differences:
        return (
            f"the {len(built):,} records of the {len(finished):,} finished shards agree on "
            f"{', '.join(_COMPARED)}: labels, boxes, reports, image paths or unfinished "
            "shards differ"
        )
    first = next(iter(differences))
    return (
        f"{len(differences):,} of the {len(built):,} records in the {len(finished):,} finished "
        f"shards differ, first {first}: {differences[first]}"
    )


def _show(value: object) -> str:
    """A compared value as the user wrote it: ``86``, not ``86.0``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _differs(old: object, new: object) -> bool:
    """Manifest value against record value: None and NaN alike, numbers as numbers."""
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return new is not None
    if isinstance(old, float) and isinstance(new, (int, float)):
        return float(old) != float(new)
    return old != new


def _json(value: object) -> object:
    """``value`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


def remove_source(out: Path, source: str) -> None:
    """Delete a source's shards, manifest partitions and build.json entry (an unreadable
    build.json is replaced: it is exactly what --overwrite is for)."""
    shutil.rmtree(out / "shards" / source, ignore_errors=True)
    for table in TABLES:
        shutil.rmtree(partition_dir(out, table, source), ignore_errors=True)
    shutil.rmtree(part_dir(out, source), ignore_errors=True)
    remove_empty_folder(part_dir(out, source).parent)
    with _locked_build_file(out, replace_invalid=True) as data:
        data.get("sources", {}).pop(source, None)


def read_build_file(out: Path) -> dict:
    path = Path(out) / BUILD_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BuildError(
            f"{path} is not valid JSON ({error}); rebuild with `machex build ... --overwrite` "
            "(which replaces it), or delete it"
        ) from None


def unfinished_sources(out: Path, sources: Iterable[str]) -> list[str]:
    """Those of ``sources`` whose build in ``out`` is not complete: interrupted, still
    running, or made of ``--part`` runs not yet merged (a part never writes build.json, and
    only ``machex merge`` checks that every part finished). A source with neither a
    build.json entry nor part records (written before build.json kept a status) counts as
    complete."""
    builds = read_build_file(out).get("sources", {})
    return sorted(s for s in sources if _build_status(out, s, builds.get(s)) != "complete")


def _build_status(out: Path, source: str, entry: dict | None) -> str:
    """build.json's status of ``source``; without an entry, ``unmerged`` where part records
    wait for ``machex merge`` (an entry decides: a complete one means every shard is done)."""
    if entry is not None:
        return str(entry.get("status", "complete"))
    folder = part_dir(out, source)
    return "unmerged" if folder.is_dir() and any(folder.glob("part-*.json")) else "complete"


@contextmanager
def _locked_build_file(out: Path, *, replace_invalid: bool = False) -> Iterator[dict]:
    """Read-modify-write build.json under a file lock, replacing it atomically."""
    lock_path = out / ".build.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = read_build_file(out)
        except BuildError:
            if not replace_invalid:
                raise
            log.warning("%s is unreadable; starting a new one", out / BUILD_FILE)
            data = {}
        yield data
        data["schema_version"] = SCHEMA_VERSION
        data["machex_version"] = __version__
        tmp = out / f"{BUILD_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / BUILD_FILE)


def update_build_file(out: Path, source: str, entry: dict) -> None:
    """Replace the source's entry (stamped ``updated``), leaving the others as they are."""
    with _locked_build_file(out) as data:
        data.setdefault("sources", {})[source] = entry | {"updated": utc_now()}


def prepare_out(out: Path) -> None:
    """Create the output folder and its lock folder before any work (one-line errors)."""
    from machex.folders import FolderError, make_folder

    try:
        make_folder(out, "--out", ".locks")
    except FolderError as error:
        raise BuildError(str(error)) from None


@contextmanager
def source_lock(out: Path, source: str, *, shared: bool = False) -> Iterator[None]:
    """One build per source and output folder at a time (released even on kill -9); part
    runs take it ``shared``: any number of parts, but no whole build or merge beside them."""
    locks = out / ".locks"
    locks.mkdir(exist_ok=True)
    # "a+": never truncate a shared file, and readable, which a shared lock needs where
    # flock becomes a POSIX record lock (the Linux NFS client): EBADF on a write-only handle.
    with open(locks / f"{source}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            running = "a whole build or a merge" if shared else "another build"
            raise BuildError(f"{running} of {source} into {out} is running") from None
        yield


def _part_lock(out: Path, source: str, part: Part | None) -> AbstractContextManager[None]:
    """The same part may not run twice at once (two array tasks given one index)."""
    return nullcontext() if part is None else _exclusive(part_file(out, source, part), part)


@contextmanager
def _exclusive(record: Path, part: Part) -> Iterator[None]:
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record.with_suffix(".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"part {part.label} is already running ({record})") from None
        yield


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
