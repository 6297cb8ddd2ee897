"""Job-array parts: ``--part I/N`` builds every N-th shard of the plan, starting at shard I.

Parts are numbered from 0 (``--part 0/4`` .. ``--part 3/4``), as SLURM's
``--array=0-3`` numbers ``$SLURM_ARRAY_TASK_ID``. A part writes its own shards and
fragments and one record, ``OUT/.parts/<source>/part-I-of-N.json``; it never writes
``build.json``, so parts on different machines sharing a filesystem never write the same
file. ``machex merge OUT`` checks every part's record and writes ``build.json`` as a
single build would (``machex.merge``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from machex.shards import unique_temporary

PARTS_DIR = ".parts"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FILE = re.compile(r"^part-(\d+)-of-(\d+)\.json$")

T = TypeVar("T")


class PartError(ValueError):
    """A malformed ``--part``, or part records that do not fit together (exit code 2)."""


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count``: the shards whose position in the plan % count == index."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        match = _SPEC.match(text)
        if not match:
            raise PartError(
                f"--part {text}: expected I/N, e.g. --part 0/4 (parts are numbered from 0)"
            )
        part = cls(int(match[1]), int(match[2]))
        if part.count < 1:  # before I: with N = 0 there is no range for I to be in
            raise PartError(f"--part {text}: N must be at least 1 (--part 0/1 is the whole)")
        if not 0 <= part.index < part.count:
            raise PartError(
                f"--part {text}: I must be in 0..{part.count - 1} (parts are numbered from 0: "
                "--part 0/2 and --part 1/2 make a whole)"
            )
        return part

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: list[T]) -> list[T]:
        """This part's share of the plan's shards, deterministic from their order alone."""
        return items[self.index :: self.count]


def part_dir(out: Path, source: str) -> Path:
    return Path(out) / PARTS_DIR / source


def part_file(out: Path, source: str, part: Part) -> Path:
    return part_dir(out, source) / f"part-{part.index}-of-{part.count}.json"


def write_part_record(out: Path, source: str, part: Part, record: dict) -> Path:
    """Write this part's record atomically (a private temporary file, then rename)."""
    path = part_file(out, source, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(path)
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_part_records(out: Path, source: str) -> dict[Part, dict]:
    """Every part record of ``source`` in ``out``, by part (empty when there are none)."""
    records: dict[Part, dict] = {}
    folder = part_dir(out, source)
    for path in sorted(folder.glob("part-*.json")) if folder.is_dir() else []:
        match = _FILE.match(path.name)
        if not match:
            continue
        try:
            records[Part(int(match[1]), int(match[2]))] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PartError(
                f"{path} is not valid JSON ({error}): restore it, or build the parts into a "
                "new --out (a part cannot be checked against a record it cannot read)"
            ) from None
    return records


def sources_with_parts(out: Path) -> list[str]:
    folder = Path(out) / PARTS_DIR
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
