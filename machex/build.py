"""The one orchestrator: adapter -> records -> image pipeline -> shards -> manifests.

Work is cut into shards fixed by the plan alone (records sorted by key, ``shard_size`` per
shard, per split), so the output does not depend on ``--workers`` and a shard is the unit of
resumption: a shard counts as done once its ``images`` fragment exists, which is written
after the tar and the other fragments. Killing the build at any point and running it again
redoes at most the shard that was in flight.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from joblib import Parallel, cpu_count, delayed
from joblib.externals.loky import get_reusable_executor

from machex import __version__
from machex.adapters import MetadataError, SourceAdapter, SourcePlan, get_adapter
from machex.adapters.base import DEFAULT_PLAN, PlanOptions
from machex.assemble import (
    DEFAULT_REPORT_CHOICE,
    BuiltSample,
    build_sample,
    failure_row,
    report_row,
)
from machex.imaging import PixelOptions
from machex.manifests import (
    COMMIT_TABLE,
    SCHEMA_VERSION,
    TABLES,
    fragment_path,
    load_manifest,
    partition_dir,
    write_fragment,
)
from machex.records import Failure, ImageRecord, ReportChoice
from machex.shards import ShardWriter, remove_stale_temporaries
from machex.tables import DEFAULT_VIEWS, ViewSelection, load_source_tables

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: its file stem and its records, in key order."""

    stem: str
    split: str
    records: tuple[ImageRecord, ...]


@dataclass
class SourceResult:
    """What a build of one source did; ``status`` is ``built``, ``up_to_date``."""

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
        } | ({"path_rules": summary["path_rules"]} if "path_rules" in summary else {})


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


def plan_fingerprint(specs: list[ShardSpec]) -> str:
    """Hash of the shard layout and every record's content (labels, ages, boxes, paths...):
    a resume must see exactly the plan the finished shards were built from."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(spec.stem.encode())
        for record in spec.records:
            digest.update(b"\0" + repr(record).encode())
    return digest.hexdigest()


def report_owners(records: list[ImageRecord]) -> frozenset[str]:
    """Keys of the first record (by key) of each study that has a report."""
    first: dict[str, str] = {}
    for record in records:
        if record.report is not None:
            study = record.report.study_id
            if study not in first or record.key < first[study]:
                first[study] = record.key
    return frozenset(first.values())


def shard_path(out: Path, source: str, stem: str) -> Path:
    return out / "shards" / source / f"{stem}.tar"


def is_shard_done(out: Path, source: str, stem: str) -> bool:
    """The images fragment is written last, after the tar (none when every image failed)."""
    return fragment_path(out, COMMIT_TABLE, source, stem).is_file()


def build_source(
    name: str,
    root: Path,
    out: Path,
    options: BuildOptions = BuildOptions(),
    *,
    overwrite: bool = False,
    hooks: ProgressHooks | None = None,
    plan: SourcePlan | None = None,
) -> SourceResult:
    """Build (or resume, or confirm) one source into ``out``; ``plan`` if it was already
    made with these options (``plan_source``)."""
    hooks = hooks or ProgressHooks()
    out = Path(out)
    check_options(options)
    plan = plan or plan_source(name, root, options.plan_options)
    source = plan.source
    specs = shard_specs(plan, options.shard_size)
    fingerprint = plan_fingerprint(specs)
    out.mkdir(parents=True, exist_ok=True)

    with _source_lock(out, source):
        if overwrite:
            remove_source(out, source)
            previous = None
        else:
            previous = read_build_file(out).get("sources", {}).get(source)
            if previous is not None:
                _check_compatible(previous, options, fingerprint, source, plan.root)
            elif any((out / "shards" / source).glob("*.tar")):
                raise BuildError(
                    f"{out} holds shards of {source} but build.json has no record of how "
                    "they were built; add --overwrite to rebuild them"
                )
        for folder in (out / "shards" / source, *(partition_dir(out, t, source) for t in TABLES)):
            remove_stale_temporaries(folder)

        todo = [s for s in specs if not is_shard_done(out, source, s.stem)]
        from machex.adapters import get_adapter

        entry = {
            "root": str(plan.root),
            # The data-use terms travel with the build: shards derived from credentialed
            # sources (PhysioNet, Stanford, BIMCV) must not be redistributed.
            "licence": get_adapter(source).licence,
            "options": _options_record(options),
            "plan_fingerprint": fingerprint,
            "status": "in_progress",
        }
        if not todo and previous is not None and previous.get("status") == "complete":
            log.info("%s: already complete in %s, nothing to do", source, out)
            return _result(out, plan, specs, status="up_to_date", shards_written=0)

        _update_build_file(out, source, entry)
        remaining = sum(len(s.records) for s in todo)
        hooks.on_start(source, len(plan.records), len(plan.records) - remaining)
        owners = report_owners(plan.records)
        for spec, samples in _process(todo, options, plan.root, hooks.on_advance):
            _write_shard(out, source, spec, samples, owners)

        result = _result(out, plan, specs, status="built", shards_written=len(todo))
        counts = result.to_dict() | {"status": "complete", "finished": _now()}
        _update_build_file(out, source, entry | counts)
        return result


def _process(
    todo: list[ShardSpec], options: BuildOptions, root: Path, on_advance: Callable[[int], None]
) -> Iterator[tuple[ShardSpec, list[BuiltSample | Failure]]]:
    """Yield each shard with its processed samples, in order, processing in parallel.

    joblib returns results in submission order, so shards fill one after another while
    the workers run ahead; nothing depends on which worker did what.
    """
    if not todo:
        return
    records = [record for spec in todo for record in spec.records]
    spec_of = [index for index, spec in enumerate(todo) for _ in spec.records]
    parallel = Parallel(n_jobs=options.workers, return_as="generator", batch_size=4)
    results = parallel(
        delayed(build_sample)(record, options.pixels, root, options.report) for record in records
    )
    buffer: list[BuiltSample | Failure] = []
    try:
        for index, result in zip(spec_of, results):
            buffer.append(result)
            on_advance(1)
            if len(buffer) == len(todo[index].records):  # every shard holds >= 1 record
                yield todo[index], buffer
                buffer = []
    finally:
        # joblib keeps its worker processes for reuse; a build run inside a multiprocessing
        # child (a scheduler, a notebook helper) would then hang at exit joining them.
        if options.workers != 1:  # n_jobs=1 runs in this process: no pool to release
            get_reusable_executor().shutdown(wait=True)


def _write_shard(
    out: Path,
    source: str,
    spec: ShardSpec,
    samples: list[BuiltSample | Failure],
    report_owners: frozenset[str] = frozenset(),
) -> None:
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


def _result(
    out: Path, plan: SourcePlan, specs: list[ShardSpec], *, status: str, shards_written: int
) -> SourceResult:
    images = load_manifest(out, "images", [plan.source])
    failed = len(load_manifest(out, "failures", [plan.source]))
    return SourceResult(
        plan.source,
        status,
        len(plan.records),
        len(images),
        failed,
        len(specs),
        shards_written,
        plan.summary(),
        boxes=len(load_manifest(out, "bboxes", [plan.source])),
        boxes_outside=int(images["boxes_outside"].fillna(0).sum()),
    )


def _options_record(options: BuildOptions) -> dict[str, object]:
    record = asdict(options)
    record["views"] = options.views.spec
    record["reports"] = str(options.reports) if options.reports else None
    record["report"] = options.report.as_dict()
    record["pixels"]["encoding"] = options.pixels.encoding.value
    record["pixels"]["intensity"] = options.pixels.intensity.value
    workers = options.workers if options.workers > 0 else max(1, cpu_count() + 1 + options.workers)
    return record | {"workers_used": workers, "fingerprint": options.output_fingerprint()}


def _check_compatible(
    previous: dict, options: BuildOptions, fingerprint: str, source: str, root: Path
) -> None:
    if previous.get("root") not in (None, str(root)):
        raise BuildError(
            f"{source} in this folder was built from {previous['root']}, not {root}; "
            "use the same --root to resume, or add --overwrite to rebuild"
        )
    old = previous.get("options", {}).get("fingerprint")
    if old != options.output_fingerprint():
        raise BuildError(
            f"{source} was built with {old}, now asked for {options.output_fingerprint()}; "
            "re-run with the same options to resume, or add --overwrite to rebuild"
        )
    if previous.get("plan_fingerprint") != fingerprint:
        raise BuildError(
            f"the metadata of {source} changed since the build in this folder started "
            "(different images or shard layout); add --overwrite to rebuild"
        )


def remove_source(out: Path, source: str) -> None:
    """Delete a source's shards, manifest partitions and build.json entry (an unreadable
    build.json is replaced: it is exactly what --overwrite is for)."""
    shutil.rmtree(out / "shards" / source, ignore_errors=True)
    for table in TABLES:
        shutil.rmtree(partition_dir(out, table, source), ignore_errors=True)
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
            f"{path} is not valid JSON ({error}); delete it or use --overwrite"
        ) from None


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


def _update_build_file(out: Path, source: str, entry: dict) -> None:
    with _locked_build_file(out) as data:
        data.setdefault("sources", {})[source] = entry | {"updated": _now()}


@contextmanager
def _source_lock(out: Path, source: str) -> Iterator[None]:
    """One build per source and output folder at a time (released even on kill -9)."""
    locks = out / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{source}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another build of {source} into {out} is running") from None
        yield


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
