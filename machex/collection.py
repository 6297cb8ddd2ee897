"""The whole collection in one go: a roots file names each source's folder, and every
source is planned or built into one ``--out``, exactly as one ``--source`` at a time would.

``roots.toml``::

    chestxray14 = "/data/ChestX-ray14"
    chexpert = "/data/CheXpert-v1.0"
    mimic = { root = "/data/mimic-cxr-jpg/2.0.0", reports = "/data/mimic-cxr-reports.zip" }
    brax = { root = "/data/brax/1.1.0", prefer = "png" }

A value is the dataset root, or a table with ``root`` and the per-source choices
``prefer`` and ``reports`` (the same as ``--prefer`` and ``--reports`` for one source).
Relative paths are relative to the roots file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import tomllib

from machex.adapters import get_adapter
from machex.adapters.base import MetadataError, SourcePlan
from machex.build import (
    BuildOptions,
    ProgressHooks,
    SourceResult,
    build_source,
    check_images_present,
    plan_source,
)
from machex.executors import ShardExecutor
from machex.parts import Part

#: Keys a source's table in the roots file may have.
ROOT_KEYS = ("root", "prefer", "reports")


@dataclass(frozen=True)
class SourceRoot:
    """Where one source is, and its per-source choices."""

    source: str
    root: Path
    prefer: str | None = None
    reports: Path | None = None


def read_roots(path: Path) -> list[SourceRoot]:
    """The sources of a roots file, by canonical name, in the file's order.

    Raises ``MetadataError`` naming the file and the entry for anything it cannot use."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetadataError(f"--roots {path}: no such file") from None
    except IsADirectoryError:
        raise MetadataError(
            f"--roots {path} is a folder; --roots takes a TOML file naming each source's "
            "folder (docs/cli.md), --root one source's folder"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise MetadataError(f"--roots {path}: not valid TOML ({error})") from None
    document = document.get("roots", document)  # a [roots] table or top-level keys
    if not isinstance(document, dict):
        raise MetadataError(
            f"--roots {path}: roots must be a table of sources, e.g. [roots] then "
            f'chexpert = "/data", not {document!r}'
        )
    if not document:
        raise MetadataError(f'--roots {path}: names no source; expected e.g. chexpert = "/data"')
    roots: list[SourceRoot] = []
    for name, value in document.items():
        try:
            source = get_adapter(name).name
        except MetadataError as error:
            raise MetadataError(f"--roots {path}: {error}") from None
        if isinstance(value, str):
            value = {"root": value}
        if not isinstance(value, dict) or "root" not in value:
            raise MetadataError(
                f'--roots {path}: {name} must be a path or a table with root = "..."'
            )
        unknown = sorted(set(value) - set(ROOT_KEYS))
        if unknown:
            raise MetadataError(f"--roots {path}: {name} has {unknown}; expected {ROOT_KEYS}")
        if any(r.source == source for r in roots):
            raise MetadataError(f"--roots {path}: {source} is named twice")
        roots.append(
            SourceRoot(
                source,
                _resolve(path, value["root"]),
                value.get("prefer"),
                _resolve(path, value["reports"]) if value.get("reports") else None,
            )
        )
    return roots


def _resolve(roots_file: Path, text: object) -> Path:
    if not isinstance(text, str) or not text:
        raise MetadataError(f"--roots {roots_file}: expected a path, got {text!r}")
    candidate = Path(text).expanduser()
    return candidate if candidate.is_absolute() else roots_file.parent / candidate


def source_options(entry: SourceRoot, options: BuildOptions) -> BuildOptions:
    """The shared options with the source's own ``prefer`` and ``reports`` from the file."""
    overrides = {"prefer": entry.prefer, "reports": entry.reports}
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def plan_collection(roots: list[SourceRoot], options: BuildOptions) -> list[SourcePlan]:
    """Every source's plan (metadata only), in the roots file's order."""
    return [
        plan_source(entry.source, entry.root, source_options(entry, options).plan_options)
        for entry in roots
    ]


def build_collection(
    roots: list[SourceRoot],
    out: Path,
    options: BuildOptions,
    *,
    overwrite: bool = False,
    hooks: ProgressHooks | None = None,
    executor: ShardExecutor | None = None,
    part: Part | None = None,
    retry_failed: bool = False,
) -> dict[str, SourceResult]:
    """Build (or resume) every source into ``out``, one after the other, on ``executor``
    (default: this machine), or only ``part`` of each. Every source is planned first, so a
    bad root, bad metadata or a source without its images stops the run before any image
    is read."""
    plans = plan_collection(roots, options)
    for plan in plans:
        check_images_present(plan)
    return {
        entry.source: build_source(
            entry.source,
            entry.root,
            out,
            source_options(entry, options),
            overwrite=overwrite,
            hooks=hooks,
            plan=plan,
            executor=executor,
            part=part,
            retry_failed=retry_failed,
        )
        for entry, plan in zip(roots, plans)
    }
