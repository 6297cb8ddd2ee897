"""Output folders that commands create: what stops that (a file in the way, a read-only or
full disk) becomes a one-line error naming the option, before any work is done. And the one
way files are written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


class FolderError(ValueError):
    """An output folder that cannot be created or written."""


def make_folder(path: Path, option: str, *inside: str) -> Path:
    """Create ``path`` (and its parents, and its subfolders ``inside``) for the command-line
    ``option`` that named it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in inside:
            (path / name).mkdir(exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise FolderError(
            f"{option} {path}: {blocking} is a file; expected a folder (or a path to create)"
        ) from None
    except OSError as error:
        raise FolderError(
            f"{option} {path}: cannot write there ({error.strerror}); expected a writable folder"
        ) from None
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a ``.tmp`` beside it, renamed over it,
    so a crash never leaves a half-written file under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
