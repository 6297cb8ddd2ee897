"""Rich rendering of plans, build results and stats (stdout for results, stderr for progress)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from machex.build import ProgressHooks
from machex.records import FINDINGS

stdout = Console(soft_wrap=True)
if not stdout.is_terminal:  # piped to a file or a pager: don't squeeze tables into 80 columns
    stdout = Console(soft_wrap=True, width=160)
stderr = Console(stderr=True, soft_wrap=True)


@contextmanager
def build_progress(enabled: bool, console: Console | None = None) -> Iterator[ProgressHooks]:
    """A per-source progress bar with images/s and ETA (on stderr unless told otherwise),
    or nothing when disabled or not on a terminal."""
    console = console or stderr
    if not enabled or not console.is_terminal:
        yield ProgressHooks()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[speed_text]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    state: dict[str, int] = {}

    def on_start(source: str, total: int, done: int) -> None:
        # On a resume the shards already done count as complete from the start.
        state["task"] = progress.add_task(source, total=total, completed=done, speed_text="")

    def on_advance(n: int) -> None:
        task_id = state["task"]
        progress.advance(task_id, n)
        speed = progress.tasks[task_id].speed
        progress.update(task_id, speed_text=f"{speed:,.1f} img/s" if speed else "")

    with progress:
        yield ProgressHooks(on_start, on_advance)


def new_table(title: str, columns: list[str]) -> Table:
    """A table whose cells wrap rather than being cut with an ellipsis on narrow terminals."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
    return table


def plan_table(source: str, summary: dict) -> None:
    table = new_table(f"{source}: dry run", ["", "count"])
    table.add_row("planned", f"{summary['planned']:,}")
    table.add_row("to build", f"{summary['to_build']:,}")
    for split, n in summary["by_split"].items():
        table.add_row(f"  split {split}", f"{n:,}")
    for view, n in summary["by_view"].items():
        table.add_row(f"  view {view}", f"{n:,}")
    for reason, n in summary["skipped"].items():
        table.add_row(f"skipped: {reason}", f"{n:,}")
    table.add_row("known bad", f"{summary['known_bad']:,}")
    table.add_row("missing files", f"{summary['missing_files']:,}")
    if summary.get("studies"):
        table.add_row("studies", f"{summary['studies']:,}")
    for language, n in summary.get("reports", {}).items():
        table.add_row(f"  with a report ({language})", f"{n:,}")
    for rule, n in summary.get("path_rules", {}).items():
        table.add_row(f"path found: {rule}", f"{n:,}")
    stdout.print(table)
    for warning in summary["warnings"]:
        stdout.print(f"[yellow]warning:[/] {warning}")


def stats_tables(stats: dict) -> None:
    """The stats as a handful of rich tables."""
    splits = sorted({s for per in stats["images"].values() for s in per})
    table = new_table(
        f"Images in {stats['out']} ({stats['total_images']:,} total)", ["source", *splits, "total"]
    )
    for source, per in sorted(stats["images"].items()):
        table.add_row(source, *(f"{per.get(s, 0):,}" for s in splits), f"{sum(per.values()):,}")
    stdout.print(table)

    table = new_table("Views, sex, age", ["source", "views", "sex", "age q1/median/q3 (missing)"])
    for source in sorted(stats["images"]):
        views = ", ".join(f"{k} {v:,}" for k, v in sorted(stats["views"].get(source, {}).items()))
        sex = ", ".join(f"{k} {v:,}" for k, v in sorted(stats["sex"].get(source, {}).items()))
        age = stats["age"].get(source, {})
        quartiles = "/".join(
            "-" if age.get(q) is None else f"{age[q]:g}" for q in ("q1", "median", "q3")
        )
        table.add_row(source, views, sex, f"{quartiles} ({age.get('missing', 0):,})")
    stdout.print(table)

    sources = sorted(stats["labels"])
    if sources:
        table = new_table("Unified labels: positive % (uncertain %)", ["finding", *sources])
        for finding in FINDINGS:
            cells = []
            for source in sources:
                row = stats["labels"][source][finding]
                total = sum(row[k] for k in ("positive", "negative", "uncertain", "not_mentioned"))
                if row["not_mentioned"] == total:
                    cells.append("n/a")
                else:
                    cells.append(
                        f"{100 * row['prevalence']:.1f} ({100 * row['uncertain'] / total:.1f})"
                    )
            table.add_row(finding, *cells)
        stdout.print(table)

    table = new_table(
        "Reports, boxes, failures, skips",
        ["source", "reports", "boxes (images)", "failures", "skipped"],
    )
    everything = sorted(set(stats["images"]) | set(stats["failures"]) | set(stats["skipped"]))
    for source in everything:
        boxes = stats["bboxes"].get(source, {"boxes": 0, "images": 0})
        failures = ", ".join(f"{k} {v:,}" for k, v in stats["failures"].get(source, {}).items())
        skipped = ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].get(source, {}).items())
        table.add_row(
            source,
            f"{stats['reports'].get(source, 0):,}",
            f"{boxes['boxes']:,} ({boxes['images']:,})",
            failures or "0",
            skipped or "0",
        )
    stdout.print(table)
    licences = {s: b.get("licence") for s, b in stats.get("builds", {}).items() if b.get("licence")}
    if licences:
        table = new_table(
            "Data-use terms (do not redistribute shards of credentialed sources)",
            ["source", "licence"],
        )
        for source, licence in sorted(licences.items()):
            table.add_row(source, licence)
        stdout.print(table)


def paper_table(comparison: dict) -> None:
    """Our counts beside the paper's Table 1 and summary figures, with the known reasons."""

    def number(value: object, fmt: str = ",") -> str:
        return "-" if value is None else format(value, fmt)

    table = new_table(
        f"Against the paper's Table 1 ({comparison['composition']})",
        [
            "source",
            "patients",
            "train",
            "test",
            "in MaCheX",
            "%",
            "ours",
            "ours %",
            "diff",
            "our patients",
            "status",
        ],
    )
    for row in comparison["rows"]:
        paper, ours = row["paper"], row["ours"]
        table.add_row(
            row["source"],
            number(paper["patients"]),
            number(paper["train"]),
            number(paper["test"]),
            number(paper["in_machex"]),
            number(paper["share_percent"]),
            number(ours["in_composition"]),
            number(ours["share_percent"]),
            number(row["difference"], "+,"),
            number(ours["patients"]),
            row["status"],
        )
    totals = comparison["totals"]
    table.add_row(
        "total", "", "", "", f"{totals['paper_in_machex']:,}", "",
        f"{totals['ours_in_composition']:,}", "", "", "", "",
    )  # fmt: skip
    stdout.print(table)
    figures = new_table("Summary figures", ["figure", "paper", "ours", "ok"])
    for figure in comparison["summary"]:
        prefix = "over " if figure["comparison"] == "at_least" else ""
        figures.add_row(
            figure["figure"],
            f"{prefix}{figure['paper']:,}",
            f"{figure['ours']:,}",
            "yes" if figure["ok"] else "no",
        )
    stdout.print(figures)
    for row in comparison["rows"]:
        if row["status"] == "differs":
            stdout.print(f"[bold]{row['source']}[/]: {row['note']}", highlight=False)


def emit_json(document: dict) -> None:
    """Exactly one JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
