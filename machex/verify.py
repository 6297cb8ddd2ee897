"""Check a built collection against its manifests: every image's bytes and every tar's members.

For each shard the tar headers are streamed once (``tarfile`` iteration, no index scan per
row) and compared with the ``images`` rows that name the shard: members missing, at another
offset or size than the manifest says, duplicated, or not in the manifest (an image member's
``<key>.json`` sibling is expected, anything else is extra). Every row's bytes are read at
its manifest ``offset``/``size`` and their sha256 recomputed. Rows whose shard file is gone,
and ``.tar`` files under ``shards/`` that no row names, are reported too.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machex.manifests import load_manifest

#: Problem kinds, in the order they are listed.
KINDS = (
    "missing_shard",  # rows name a shard file that does not exist
    "unreadable_shard",  # the tar cannot be read (truncated, not a tar)
    "missing_member",  # a row's image member is not in its tar
    "location_mismatch",  # the member's header offset/size differ from the manifest's
    "hash_mismatch",  # the bytes at the manifest's offset/size do not hash to its sha256
    "truncated",  # the manifest's offset/size run past the end of the file
    "missing_json",  # an image member without its ``<key>.json`` sibling
    "duplicate_member",  # a member name twice in one tar
    "extra_member",  # a member no row accounts for
    "unlisted_shard",  # a ``.tar`` under shards/ that no row names
)
CHUNK = 1 << 20


class NotACollection(ValueError):
    """The folder holds no built collection (no ``manifests/images``)."""


@dataclass(frozen=True)
class Problem:
    kind: str
    shard: str  # relative to OUT
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


def _check_shard(out: Path, shard: str, rows: list, report: VerifyReport) -> None:
    """Compare one tar with its rows (``itertuples`` of the images table)."""
    path = out / shard
    by_member = {row.member: row for row in rows}
    expected_json = {f"{row.key}.json": row for row in rows}
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # lazy: headers only, data skipped
                name = info.name
                if name in seen:
                    report.problems.append(Problem("duplicate_member", shard, name))
                    continue
                seen.add(name)
                row = by_member.get(name)
                if row is not None:
                    if (info.offset_data, info.size) != (row.offset, row.size):
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
                elif name not in expected_json:
                    report.problems.append(Problem("extra_member", shard, name))
    except (tarfile.TarError, OSError, EOFError) as error:
        report.problems.append(Problem("unreadable_shard", shard, detail=str(error)))
    for member, row in by_member.items():
        if member not in seen:
            report.problems.append(Problem("missing_member", shard, member, row.key))
    for member, row in expected_json.items():
        if member not in seen and row.member in seen:
            report.problems.append(Problem("missing_json", shard, member, row.key))


def verify_collection(out: Path, on_advance: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every shard and image of the collection in ``out``; ``on_advance(n)`` is called
    as rows are hashed (for a progress bar; the total is the number of ``images`` rows)."""
    out = Path(out)
    if not (out / "manifests" / "images").is_dir():
        raise NotACollection(f"{out} holds no MaCheX build (no manifests/images/)")
    images = load_manifest(out, "images")
    report = VerifyReport(out=out, images=len(images))
    named = set()
    for shard, group in images.sort_values(["shard", "offset"]).groupby("shard", sort=True):
        named.add(shard)
        rows = list(group.itertuples(index=False))
        report.shards += 1
        path = out / shard
        if not path.is_file():
            report.problems.append(
                Problem("missing_shard", shard, detail=f"named by {len(rows)} images rows")
            )
            if on_advance:
                on_advance(len(rows))
            continue
        _check_shard(out, shard, rows, report)
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
