"""``machex``: build, inspect and demo the MaCheX collection. Exit codes: 0 success, 1 a data
gate failed (failure rate over the limit), 2 bad usage or input found before any work,
130 interrupted (state left resumable)."""

from __future__ import annotations

import errno
import logging
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import typer

from cli import render
from machex import __version__
from machex.adapters import ADAPTERS, ALIASES, MetadataError, SourcePlan, get_adapter
from machex.build import (
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_SHARD_SIZE,
    BuildError,
    BuildOptions,
    SourceResult,
    build_source,
    check_modes,
    check_options,
    missing_images_warning,
    read_build_file,
)
from machex.collection import SourceRoot, build_collection, plan_collection, read_roots
from machex.executors import (
    DaskSettings,
    ExecutorError,
    ShardsFailed,
    SlurmSettings,
    check_executor,
    open_executor,
)
from machex.imaging import Encoding, Intensity, PixelOptions, PngDecoder
from machex.manifests import ManifestError
from machex.paper import PAPER, CollectionCounts, compare_with_paper
from machex.parts import Part, PartError
from machex.plots import plot_collection
from machex.records import ReportChoice
from machex.stats import collection_stats
from machex.tables import TableError, ViewSelection, known_view_groups

app = typer.Typer(
    name="machex",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Build the MaCheX chest X-ray collection from the public datasets as downloaded.",
)

Source = Annotated[
    str,
    typer.Option(
        "--source",
        "-s",
        help=f"Dataset to build: {', '.join(sorted(ADAPTERS))}, or all (with --roots) "
        f"(aliases: {', '.join(f'{k}={v}' for k, v in sorted(ALIASES.items()))}).",
    ),
]
Root = Annotated[
    Path | None,
    typer.Option(
        "--root", help=("The dataset folder exactly as unpacked from the official release.")
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder of the collection.")]
Workers = Annotated[int, typer.Option("--workers", "-j", help="Worker processes (-1: all cores).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout only.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Composition = Annotated[
    str | None,
    typer.Option(
        "--composition",
        help="Compare with a named collection of the paper, e.g. paper-2023 (its Table 1).",
    ),
]

_state = {"debug": False}
# ManifestError: a damaged or old-schema manifest fragment (the message says to rebuild).
INPUT_ERRORS = (MetadataError, TableError, BuildError, ExecutorError, PartError, ManifestError)
MaxFailureRate = Annotated[
    float,
    typer.Option("--max-failure-rate", help="Exit 1 if more than this fraction of images fail."),
]


def _fail(message: str, code: int) -> typer.Exit:
    """Print one line (and, with --debug, the traceback being handled) and exit ``code``."""
    if _state["debug"]:
        traceback.print_exc()
    render.stderr.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


#: Errors of the disk written to (full, over quota, read-only): one line, not a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _disk_error(error: OSError, kept: str = "") -> typer.Exit:
    """A full or read-only output disk as one line (exit 2); any other OSError re-raised."""
    if error.errno not in DISK_ERRNOS:
        raise error
    where = f" {error.filename}" if error.filename else ""
    return _fail(
        f"cannot write{where}: {error.strerror}; free space or make it writable, then run the "
        f"same command again{kept}",
        2,
    )


def _check_output_file(path: Path, option: str) -> None:
    """A figure the command will write: not a folder, and its folder there or creatable
    (checked before the work, so a typo costs no time and gives no traceback)."""
    if path.is_dir():
        raise _fail(f"{option} {path} is a folder; give the path of the PNG file to write", 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _fail(
            f"{option} {path}: cannot create its folder {path.parent} ({error.strerror or error})",
            2,
        ) from None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)  # Dask sets its loggers to INFO: this drops their chatter too
    logging.basicConfig(level=level, handlers=[handler])  # no-op where logging is set up


@app.command()
def build(
    source: Source,
    root: Root = None,
    roots: Annotated[
        Path | None,
        typer.Option(
            "--roots",
            help="A TOML file naming each source's root (with --source all: build them all).",
        ),
    ] = None,
    out: Out = Path("machex-out"),
    workers: Workers = -1,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help=("Read the metadata and show what would be built; decode nothing.")
        ),
    ] = False,
    json_output: Json = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help=("Delete this source's previous output in OUT and rebuild it.")
        ),
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Also rebuild the finished shards that hold a failed image (after replacing "
            "or downloading the bad files); the rest is kept.",
        ),
    ] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per tar shard.")] = (
        DEFAULT_SHARD_SIZE
    ),
    encoding: Annotated[
        Encoding,
        typer.Option(
            "--encoding", help=("jpeg: grayscale q95; png: lossless 8-bit; png16: 16-bit.")
        ),
    ] = Encoding.jpeg,
    max_failure_rate: MaxFailureRate = DEFAULT_MAX_FAILURE_RATE,
    intensity: Annotated[
        Intensity,
        typer.Option(
            "--intensity",
            help="raw: the paper's rule (8-bit unchanged, deeper scaled by its bit depth); "
            "minmax: per-image stretch; window: the source's DICOM window where it has one.",
        ),
    ] = Intensity.raw,
    compat: Annotated[
        str | None,
        typer.Option(
            "--compat",
            help="machex-v1: reproduce the original MaCheX pixels (RGB JPEG q95, 16-bit >> 8, "
            "bilinear), for models trained on the original collection.",
        ),
    ] = None,
    png_decoder: Annotated[
        PngDecoder,
        typer.Option(
            "--png-decoder",
            help="Who decodes grayscale PNGs: auto (imagecodecs where installed, by "
            "machex-cheff[fast]; else Pillow), pillow, imagecodecs. Same pixels either way.",
        ),
    ] = PngDecoder.auto,
    prefer: Annotated[
        str | None,
        typer.Option(
            "--prefer",
            help="Which image files to read where a release ships several (BRAX: png, the "
            "default, or dicom); `machex sources` lists each source's formats.",
        ),
    ] = None,
    views: Annotated[
        str | None,
        typer.Option(
            "--views",
            help="Which views: frontal (default: the paper's AP/PA selection), lateral, all, "
            "or +GROUP to add a group of a source's view table (PadChest: +ap_horizontal).",
        ),
    ] = None,
    reports: Annotated[
        Path | None,
        typer.Option(
            "--reports",
            help="MIMIC-CXR: the official mimic-cxr-reports.zip or its unpacked folder, when "
            "it is not under --root.",
        ),
    ] = None,
    report_text: Annotated[
        str,
        typer.Option(
            "--report-text",
            help="The report text each sample's `report` carries: text_v1 (default: what the "
            "released Cheff report model was trained on), findings_impression, impression, "
            "findings or text. Every section is kept in the reports manifest regardless.",
        ),
    ] = "text_v1",
    report_languages: Annotated[
        str,
        typer.Option(
            "--report-languages",
            help="Comma list of report languages usable as conditioning text (default: en; "
            "PadChest's reports are es).",
        ),
    ] = "en",
    composition: Composition = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="Where the shards are built: local (worker processes here) or dask (a Dask "
            "cluster: a LocalCluster of --workers processes, --scheduler or --cluster).",
        ),
    ] = "local",
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler", help="With --executor dask: a running scheduler, e.g. tcp://host:8786."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster", help="With --executor dask: slurm (dask-jobqueue asks SLURM for workers)."
        ),
    ] = None,
    slurm_queue: Annotated[
        str | None, typer.Option("--slurm-queue", help="SLURM partition of the worker jobs.")
    ] = None,
    slurm_account: Annotated[
        str | None, typer.Option("--slurm-account", help="SLURM account to charge.")
    ] = None,
    slurm_jobs: Annotated[int, typer.Option("--slurm-jobs", help="Worker jobs to submit.")] = 1,
    slurm_cores: Annotated[
        int, typer.Option("--slurm-cores", help="Cores per job (one worker process each).")
    ] = 8,
    slurm_memory: Annotated[
        str, typer.Option("--slurm-memory", help="Memory per job, e.g. 32GB.")
    ] = "32GB",
    slurm_walltime: Annotated[
        str, typer.Option("--slurm-walltime", help="Time limit per job, HH:MM:SS.")
    ] = "04:00:00",
    slurm_extra: Annotated[
        list[str] | None,
        typer.Option("--slurm-extra", help="Another #SBATCH option, e.g. --qos=long (repeat)."),
    ] = None,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            help="I/N: build only every N-th shard from shard I (parts numbered from 0, e.g. "
            "a job array's 0/4 .. 3/4); then `machex merge OUT`.",
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Build one source (--root) or every source of a roots file (--source all --roots) into
    OUT; resumes an interrupted build. On a cluster: --executor dask, or --part I/N runs
    joined by `machex merge`."""
    try:
        try:
            pixels = PixelOptions(
                encoding=encoding, intensity=intensity, compat=compat, png_decoder=png_decoder
            )
        except ValueError as error:
            raise BuildError(str(error)) from None
        try:
            selection = ViewSelection.parse(views)
            languages = tuple(w.strip() for w in report_languages.split(",") if w.strip())
            report = ReportChoice(report_text, languages)
        except ValueError as error:
            raise BuildError(str(error)) from None
        options = BuildOptions(
            pixels, shard_size, workers, max_failure_rate, prefer, selection, report, reports
        )
        check_options(options)
        slurm = SlurmSettings(
            slurm_queue,
            slurm_account,
            slurm_jobs,
            slurm_cores,
            slurm_memory,
            slurm_walltime,
            tuple(slurm_extra or ()),
        )
        dask = DaskSettings(scheduler, cluster, slurm)
        check_executor(executor, dask)
        selected = Part.parse(part) if part is not None else None
        check_modes(overwrite=overwrite, part=selected, retry_failed=retry_failed)
        entries = _source_roots(source, root, roots)
        if len(entries) > 1 and (prefer or reports):
            raise BuildError(
                "with several sources, give prefer/reports per source in the roots file, "
                "not --prefer/--reports"
            )
        unknown = selection.groups - known_view_groups()
        if unknown:
            raise BuildError(
                f"--views {views}: no source has the view group(s) {sorted(unknown)}; "
                f"known: {sorted(known_view_groups())}"
            )
        if dry_run:
            plans = plan_collection(entries, options)
            if composition is None and len(plans) > 1:
                composition = PAPER  # several sources: show them against the paper
            paper = (
                compare_with_paper(CollectionCounts.from_plans(plans), composition)
                if composition
                else None
            )
            summaries = {plan.source: _dry_run_summary(plan) for plan in plans}
            if json_output:
                document = {"machex_version": __version__, "dry_run": True, "sources": summaries}
                render.emit_json(document | ({"paper": paper} if paper else {}))
            else:
                for name, summary in summaries.items():
                    render.plan_table(name, summary)
                if paper:
                    render.paper_table(paper)
            return
        with (
            open_executor(executor, workers=workers, dask=dask) as runner,
            render.build_progress(not (quiet or json_output)) as hooks,
        ):
            results = build_collection(
                entries,
                out,
                options,
                overwrite=overwrite,
                hooks=hooks,
                executor=runner,
                part=selected,
                retry_failed=retry_failed,
            )
    except INPUT_ERRORS as error:
        raise _fail(str(error), 2) from None
    except ShardsFailed as error:
        raise _fail(str(error), 1) from None
    except OSError as error:
        raise _disk_error(error, f" to resume (the finished shards in {out} are kept)") from None
    except KeyboardInterrupt:
        raise _fail(
            f"interrupted; the finished shards in {out} are kept: run the same command again "
            "to resume",
            130,
        ) from None
    _report_results(results, out, max_failure_rate, json_output)


def _dry_run_summary(plan: SourcePlan) -> dict[str, object]:
    """The plan's summary, warning where most images are missing (the real build refuses
    when all are)."""
    summary = plan.summary()
    missing = missing_images_warning(plan)
    if missing:
        summary["warnings"] = [*summary["warnings"], missing]
    return summary


def _report_results(
    results: dict[str, SourceResult], out: Path, max_failure_rate: float, json_output: bool
) -> None:
    """One line (or the JSON document) per source, then the failure-rate gate (exit 1)."""
    if json_output:
        render.emit_json(
            {
                "machex_version": __version__,
                "out": str(out),
                "sources": {name: result.to_dict() for name, result in results.items()},
            }
        )
    for result in [] if json_output else results.values():
        name = f"{result.source} part {result.part}" if result.part else result.source
        if result.status == "up_to_date":
            render.stdout.print(
                f"{name}: already complete in {out}, nothing to do ({result.built:,} images)"
            )
        else:
            render.stdout.print(
                f"{name}: {result.built:,} images in {result.shards} shards "
                f"({result.shards_written} written now), {result.failed:,} failed -> {out}"
            )
    parts = sorted({r.part.split("/")[1] for r in results.values() if r.part})
    if parts and not json_output:
        render.stdout.print(f"once all {'/'.join(parts)} parts are done: machex merge {out}")
    over = [r for r in results.values() if r.failure_rate > max_failure_rate]
    if over:
        raise _fail(
            "; ".join(
                f"{r.source}: {r.failed:,} of {r.to_build:,} images failed ({r.failure_rate:.2%})"
                for r in over
            )
            + f", above --max-failure-rate {max_failure_rate:.2%}; see "
            f"{out}/manifests/failures/ (once the bad files are replaced, --retry-failed "
            "rebuilds just their shards)",
            1,
        )


def _source_roots(source: str, root: Path | None, roots: Path | None) -> list[SourceRoot]:
    """``--source NAME --root DIR``, ``--source all --roots FILE``, or one source of FILE."""
    if root is not None and roots is not None:
        raise BuildError("give --root DIR (one source) or --roots FILE, not both")
    if source.strip().lower() == "all":
        if roots is None:
            raise BuildError("--source all needs --roots FILE (a TOML file naming each root)")
        return read_roots(roots)
    name = get_adapter(source).name
    if root is not None:
        return [SourceRoot(name, root)]
    if roots is None:
        raise BuildError(f"--source {source} needs --root DIR (or --roots FILE naming it)")
    entries = [e for e in read_roots(roots) if e.source == name]
    if not entries:
        raise BuildError(f"--roots {roots} does not name {name}")
    return entries


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The output folder the --part runs wrote into.")],
    max_failure_rate: MaxFailureRate = DEFAULT_MAX_FAILURE_RATE,
    json_output: Json = False,
) -> None:
    """Join the --part I/N runs of a build: check that every part finished and every shard is
    there, then write build.json as a single build would."""
    from machex.merge import merge_parts

    try:
        results = merge_parts(out)
    except INPUT_ERRORS as error:
        raise _fail(str(error), 2) from None
    _report_results(results, out, max_failure_rate, json_output)


@app.command()
def stats(
    out: Annotated[Path, typer.Argument(help="A built collection folder.")],
    composition: Composition = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also write a PNG figure (1600x1000) of the collection."),
    ] = None,
    json_output: Json = False,
) -> None:
    """Images per source and split, views, sex, age, label prevalence, failures and skips;
    with --composition, beside the paper's Table 1."""
    if not (out / "manifests").is_dir() and not (out / "build.json").is_file():
        raise _fail(f"{out} holds no MaCheX build (no manifests/ or build.json)", 2)
    if plot:
        _check_output_file(plot, "--plot")
    try:
        result = collection_stats(out)
        if composition:
            result["paper"] = compare_with_paper(CollectionCounts.from_manifests(out), composition)
        if plot:
            result["plot"] = str(plot_collection(out, plot))
    except (*INPUT_ERRORS, ValueError) as error:
        raise _fail(str(error), 2) from None
    if json_output:
        render.emit_json(result)
        return
    render.stats_tables(result)
    if composition:
        render.paper_table(result["paper"])
    if plot:
        render.stdout.print(f"figure written to {plot}")


@app.command()
def sources(json_output: Json = False) -> None:
    """The supported datasets, their access terms and citations."""
    rows = {
        a.name: {
            "aliases": list(a.aliases),
            "title": a.title,
            "homepage": a.homepage,
            "licence": a.licence,
            "citation": a.citation,
            "metadata_files": list(a.metadata_files),
            "image_formats": list(a.image_formats),
        }
        for a in ADAPTERS.values()
    }
    if json_output:
        render.emit_json({"machex_version": __version__, "sources": rows})
        return
    table = render.new_table(
        "Supported sources", ["name", "title", "licence", "metadata", "images (--prefer)"]
    )
    for name, row in rows.items():
        table.add_row(
            name,
            row["title"],
            row["licence"],
            ", ".join(row["metadata_files"]),
            ", ".join(row["image_formats"]),
        )
    render.stdout.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo collection goes.")] = (
        Path("machex-demo")
    ),
    workers: Workers = -1,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Generate a miniature copy of each supported source in its real layout, build MaCheX
    from it, and print the stats (no download)."""
    from machex.sample import make_sample

    try:
        _refuse_real_builds(out)
        with tempfile.TemporaryDirectory(prefix=DEMO_PREFIX) as scratch:
            roots = make_sample(Path(scratch))
            options = BuildOptions(workers=workers)
            results = {}
            with render.build_progress(not (quiet or json_output)) as hooks:
                for name, root in roots.items():
                    results[name] = build_source(
                        name, root, out, options, overwrite=True, hooks=hooks
                    )
    except INPUT_ERRORS as error:
        raise _fail(str(error), 2) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    stats_result = collection_stats(out)
    if json_output:
        render.emit_json(stats_result | {"demo": {n: r.to_dict() for n, r in results.items()}})
    else:
        render.stats_tables(stats_result)
        render.stdout.print(
            f"\nDemo collection written to {out}/ (shards/, manifests/, build.json)"
        )


DEMO_PREFIX = "machex-sample-"  # the demo's generated roots: a temporary folder named so


def _refuse_real_builds(out: Path) -> None:
    """The demo rebuilds each source with ``overwrite``: in a real collection's folder that
    would delete the user's shards of the same names, so any source there that the demo did
    not build (a ``build.json`` root outside its temporary folders, or shards and ``--part``
    records that ``build.json`` does not list) stops it."""
    from machex.parts import sources_with_parts

    entries = read_build_file(out).get("sources", {})
    shards = out / "shards"
    on_disk = {p.name for p in shards.iterdir() if p.is_dir()} if shards.is_dir() else set()
    real = []
    for name in sorted(set(entries) | on_disk | set(sources_with_parts(out))):
        if name not in entries:
            real.append(f"{name}: shards or --part runs that build.json does not list")
            continue
        root = Path(str(entries[name].get("root")))
        if not any(part.startswith(DEMO_PREFIX) for part in root.parts):
            real.append(f"{name} from {root}")
    if real:
        raise BuildError(
            f"{out} holds a build of real data ({real[0]}"
            + (f" and {len(real) - 1} more" if len(real) > 1 else "")
            + "); the demo would overwrite it: give the demo another --out"
        )


@app.command()
def holdout(
    out: Annotated[Path, typer.Argument(help="A built collection folder.")],
    name: Annotated[str, typer.Option("--name", help="Name of the held-out set ([A-Za-z0-9_-]+).")],
    size: Annotated[int, typer.Option("--size", "-n", help="Images to hold out.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random draw.")] = 1337,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="patient: whole patients, none of them left in training (default); image: "
            "single images, the paper's way.",
        ),
    ] = "patient",
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source", "-s", help="Draw only from these sources (repeat, or comma list)."
        ),
    ] = None,
    composition: Annotated[
        str | None,
        typer.Option(
            "--composition",
            help="Draw only from this composition's (source, split) pairs, e.g. paper-2023 "
            "(the paper's MaCheX); with --source, from both.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a held-out set of the same name.")
    ] = False,
    json_output: Json = False,
) -> None:
    """Write a named held-out set (manifests/holdouts/NAME.parquet and .json) drawn at random
    from a built collection, with a leakage report; the shards are not touched."""
    from machex.holdout import HoldoutError, make_holdout

    names = [n.strip() for s in source or () for n in s.split(",") if n.strip()]
    try:
        result = make_holdout(
            out,
            name,
            size,
            seed=seed,
            by=by,
            sources=names or None,
            composition=composition,
            overwrite=overwrite,
        )
    except (*INPUT_ERRORS, HoldoutError) as error:
        raise _fail(str(error), 2) from None
    if json_output:
        render.emit_json({"machex_version": __version__} | result.to_dict())
        return
    leakage = result.leakage
    table = render.new_table(
        f"Holdout {result.name}: {result.size:,} of {result.collection_images:,} images "
        f"(by {result.by}, seed {result.seed}, {result.size_requested:,} asked"
        + (f", composition {result.composition}" if result.composition else "")
        + ")",
        ["source", "images", "patients", "patients also in training", "their training images"],
    )
    for src, row in leakage["by_source"].items():
        table.add_row(
            src,
            f"{row['images']:,}",
            f"{row['patients']:,}",
            f"{row['patients_straddling']:,}",
            f"{row['images_outside']:,}",
        )
    table.add_row(
        "total",
        f"{leakage['images']:,}",
        f"{leakage['patients']:,}",
        f"{leakage['patients_straddling']:,}",
        f"{leakage['images_outside']:,}",
    )
    render.stdout.print(table)
    render.stdout.print(f"written to {result.path} (and {result.path.with_suffix('.json')})")


#: Problems `machex verify` prints without --json (the JSON lists them all).
VERIFY_SHOWN = 50


@app.command()
def verify(
    out: Annotated[Path, typer.Argument(help="A built collection folder.")],
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Read every manifest fragment, re-hash every image and check every tar's members
    against the manifests; exit 1 if anything is wrong."""
    from machex.verify import NotACollection, verify_collection

    try:
        with render.build_progress(not (quiet or json_output)) as hooks:
            report = verify_collection(
                out,
                on_advance=hooks.on_advance,
                on_start=lambda total: hooks.on_start("verify", total, 0),
            )
    except NotACollection as error:
        raise _fail(str(error), 2) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    if json_output:
        render.emit_json({"machex_version": __version__} | report.to_dict())
    else:
        for problem in report.problems[:VERIFY_SHOWN]:
            render.stdout.print(str(problem), highlight=False, markup=False)
        if len(report.problems) > VERIFY_SHOWN:
            more = len(report.problems) - VERIFY_SHOWN
            render.stdout.print(f"… and {more:,} more (--json lists them all)")
        render.stdout.print(
            f"{out}: {report.images:,} images in {report.shards:,} shards, "
            f"{report.hashed:,} hashed: "
            + (
                "ok"
                if report.ok
                else ", ".join(f"{kind} {n:,}" for kind, n in report.counts().items())
            ),
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command("export-index")
def export_index_command(
    out: Annotated[Path, typer.Argument(help="A built collection folder.")],
    to: Annotated[Path, typer.Option("--to", help="Folder to write the original layout to.")],
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Export only this source (repeatable)."),
    ] = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write the original MaCheX layout (SOURCE/NN/NNNNNN.jpg, RGB JPEG q95, and an index.json
    per source) for the original Cheff training code."""
    from machex.export import export_index
    from machex.verify import NotACollection

    try:
        names = [get_adapter(s).name for s in source] if source else None
        with render.build_progress(not (quiet or json_output)) as hooks:
            result = export_index(
                out,
                to,
                names,
                on_advance=hooks.on_advance,
                on_start=lambda total: hooks.on_start("export", total, 0),
            )
    except (NotACollection, MetadataError, ValueError) as error:
        raise _fail(str(error), 2) from None
    except OSError as error:
        raise _disk_error(error) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; run the same command again", 130) from None
    if json_output:
        render.emit_json({"machex_version": __version__} | result.to_dict())
        return
    for name, row in result.to_dict()["sources"].items():
        render.stdout.print(
            f"{name}: {row['images']:,} images, {row['reports']:,} with a report -> {row['index']}",
            highlight=False,
        )


@app.command()
def preview(
    out: Annotated[Path, typer.Argument(help="A built collection folder.")],
    dest: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")],
    source: Annotated[str | None, typer.Option("--source", "-s", help="Only this source.")] = None,
    where: Annotated[
        str | None,
        typer.Option(
            "--where",
            help="A pandas query over the images table joined with labels, e.g. "
            "\"split == 'test' and Cardiomegaly == 1\" (backquote names with spaces).",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many images (4 per row).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random choice.")] = 0,
    json_output: Json = False,
) -> None:
    """A contact sheet of N random images with key, source, positive findings and boxes."""
    from machex.preview import PreviewError, preview_grid
    from machex.verify import NotACollection

    _check_output_file(dest, "--out")
    try:
        name = get_adapter(source).name if source else None
        result = preview_grid(out, dest, source=name, where=where, n=n, seed=seed)
    except (NotACollection, PreviewError, MetadataError, ManifestError) as error:
        raise _fail(str(error), 2) from None
    if json_output:
        render.emit_json({"machex_version": __version__} | result.to_dict())
        return
    render.stdout.print(
        f"{len(result.keys)} of {result.matched:,} matching images -> {dest} "
        f"({result.width}x{result.height})",
        highlight=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
