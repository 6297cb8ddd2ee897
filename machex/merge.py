"""``machex merge OUT``: finish a build made of ``--part I/N`` runs.

The parts wrote every shard and manifest fragment already (the manifests are one fragment
per shard, so there is nothing to concatenate); what a part cannot write is ``build.json``,
whose counts cover the whole source. The merge checks that all N parts finished and that
every shard they list is done, then writes the source's ``build.json`` entry exactly as a
single build would, and removes the part records: the folder is then the same as after
one ``machex build`` (timestamps aside).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from machex.build import (
    BuildError,
    SourceResult,
    check_compatible,
    read_build_file,
    remove_empty_folder,
    source_lock,
    source_result,
    update_build_file,
    utc_now,
)
from machex.parts import Part, part_dir, part_file, read_part_records, sources_with_parts
from machex.shardwork import ShardSpec, is_shard_done

#: Missing shards named in an error message (the rest are counted).
SHOWN = 5


def merge_parts(out: Path) -> dict[str, SourceResult]:
    """Merge every source of ``out`` that has part records; each source is checked in full
    before its build.json entry is written."""
    out = Path(out)
    sources = sources_with_parts(out)
    if not sources:
        raise BuildError(
            f"{out} has no part runs to merge (no {out / '.parts'}/); build with "
            "`machex build ... --part I/N` first"
        )
    return {source: merge_source(out, source) for source in sources}


def merge_source(out: Path, source: str) -> SourceResult:
    """Check ``source``'s parts (all present, finished, consistent, their shards done) and
    write its build.json entry."""
    with source_lock(out, source):  # exclusive: no part of the source may still be running
        records = read_part_records(out, source)
        if not records:
            raise BuildError(f"{part_dir(out, source)} holds no part record to merge")
        first = _check_parts(out, source, records)
        previous = read_build_file(out).get("sources", {}).get(source)
        if previous is not None:
            check_compatible(previous, first["entry"], source, f"{source} in build.json")
        # The counts come from the fragments' rows, as a single build's do.
        stems = sorted(stem for record in records.values() for stem in record["shards"])
        result = source_result(
            out,
            source,
            first["summary"],
            status="built",
            shards=[ShardSpec(stem, "", ()) for stem in stems],
            shards_written=sum(int(r.get("shards_written", 0)) for r in records.values()),
        )
        counts = result.to_dict() | {"status": "complete", "finished": utc_now()}
        update_build_file(out, source, first["entry"] | counts)
        shutil.rmtree(part_dir(out, source), ignore_errors=True)
        remove_empty_folder(part_dir(out, source).parent)
        return result


def _one_split(out: Path, source: str, records: dict[Part, dict]) -> int:
    counts = sorted({part.count for part in records})
    if len(counts) > 1:
        names = ", ".join(part_file(out, source, p).name for p in sorted(records, key=_order))
        raise BuildError(
            f"{part_dir(out, source)} holds parts of {len(counts)} different splits "
            f"({names}); delete the records of the split you abandoned (the shards are kept)"
        )
    return counts[0]


def _check_parts(out: Path, source: str, records: dict[Part, dict]) -> dict:
    """All N parts present, finished, made with one plan and options, every shard done;
    returns part 0's record."""
    count = _one_split(out, source, records)
    missing = [Part(i, count) for i in range(count) if Part(i, count) not in records]
    if missing:
        labels = ", ".join(p.label for p in missing)
        raise BuildError(
            f"{source}: part {labels} missing in {out} (no "
            f"{part_file(out, source, missing[0])}); run `machex build ... --part "
            f"{missing[0].label}` with the same options, then merge again"
        )
    unfinished = [p for p in sorted(records, key=_order) if records[p].get("status") != "complete"]
    if unfinished:
        labels = ", ".join(p.label for p in unfinished)
        raise BuildError(
            f"{source}: part {labels} did not finish (still running, or interrupted: run it "
            "again with the same command, it resumes)"
        )
    first = records[Part(0, count)]
    for part, record in records.items():
        if part.index:
            where = f"part {part.label} of {source} ({part_file(out, source, part)})"
            check_compatible(first["entry"], record["entry"], source, where)
    listed = {stem for record in records.values() for stem in record["shards"]}
    planned = int(first["shards_planned"])
    if len(listed) != planned:
        raise BuildError(
            f"{source}: the parts list {len(listed)} shards, the plan has {planned}; "
            f"delete {part_dir(out, source)} and run the parts again"
        )
    not_done = sorted(stem for stem in listed if not is_shard_done(out, source, stem))
    if not_done:
        owner = {stem: part for part, r in records.items() for stem in r["shards"]}
        shown = ", ".join(f"{stem} (part {owner[stem].label})" for stem in not_done[:SHOWN])
        more = f" and {len(not_done) - SHOWN} more" if len(not_done) > SHOWN else ""
        raise BuildError(
            f"{source}: {len(not_done)} shard(s) of finished parts are not in {out}: "
            f"{shown}{more}; run those parts again (they redo only the missing shards)"
        )
    return first


def _order(part: Part) -> tuple[int, int]:
    return part.count, part.index
