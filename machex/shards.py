"""WebDataset tar shards written so that a crash never leaves a half-written shard visible.

A shard is written to ``<name>.<unique>.tmp`` and renamed into place only when complete, so
every ``.tar`` that exists is whole. The temporary name is unique per writer: a shard retried
on another machine while a presumed-dead worker still writes it never shares its file.
Member headers carry fixed metadata (mtime, owner, mode), which makes the bytes depend on the
samples alone: the same input gives the same shard, whatever the worker count or how often
the build was interrupted.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

#: Fixed member mtime (2023-01-01 UTC) so shards are byte-reproducible.
MEMBER_MTIME = 1_672_531_200
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class MemberLocation:
    """Where a member's bytes sit inside its tar: read ``size`` bytes at ``offset``."""

    name: str
    offset: int
    size: int


def padded(size: int) -> int:
    """A member's data with its padding to whole 512-byte tar blocks: the next member's header
    starts that far after the data's offset."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Writes one tar shard; use as a context manager. ``commit()`` publishes it atomically,
    leaving the block without ``commit()`` (an exception) removes the temporary file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp_path = unique_temporary(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._tar = tarfile.open(  # noqa: SIM115 - closed in commit/abort
            fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT
        )
        self._committed = False

    def add(self, name: str, data: bytes) -> MemberLocation:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = MEMBER_MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        # After addfile the tar offset sits past the data and its padding to 512 bytes.
        return MemberLocation(name, self._tar.offset - padded(len(data)), len(data))

    def commit(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        self._committed = True

    def abort(self) -> None:
        """Close and delete the temporary file, never raising: abort runs while another error
        is on its way up (often a full disk, which closing the tar hits again)."""
        if not self._committed:
            for close in (self._tar.close, self._file.close):
                with suppress(Exception):
                    close()
            with suppress(OSError):
                self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def unique_temporary(path: Path) -> Path:
    """``<name>.<pid>-<random>.tmp`` beside ``path``: one writer's private temporary file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def remove_stale_temporaries(folder: Path, stem: str | None = None) -> int:
    """Delete ``*.tmp`` leftovers of a killed build (only shard ``stem``'s, if given: a part
    run must not delete the files another part is writing); returns how many were removed."""
    removed = 0
    if folder.is_dir():
        pattern = f"{stem}.*{TMP_SUFFIX}" if stem else f"*{TMP_SUFFIX}"
        for stale in folder.rglob(pattern):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def read_member(shard: Path, offset: int, size: int) -> bytes:
    """The bytes of one member, read straight from its offset (no tar index scan)."""
    with open(shard, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: member at offset {offset} is truncated")
    return data
