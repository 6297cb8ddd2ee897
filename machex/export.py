"""Export a built collection in the original MaCheX folder layout, for the original Cheff code.

One folder per source: ``<DIR>/<source>/NN/NNNNNN.jpg`` (an RGB JPEG, quality 95; ``NNNNNN``
a 6-digit running id per source in key order, ``NN`` its first two digits) and
``<DIR>/<source>/index.json`` mapping each id to ``{"path": absolute path, "key": key}``,
plus ``"report"`` (the sample's conditioning text, the ``report`` field of its ``<key>.json``
member) where the sample has one (MIMIC-CXR).

Each image member's bytes are checked against the ``images`` manifest's sha256 before they are
decoded: a damaged member stops the export with an error naming its shard and key. A source's
old ``index.json`` is removed before any of its images is rewritten and the new one is written
last, so an ``index.json`` always describes the files beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from machex.folders import make_folder, write_atomic
from machex.manifests import load_manifest, source_names
from machex.verify import NotACollection

JPEG_QUALITY = 95
ID_DIGITS = 6
INDEX_FILE = "index.json"


@dataclass
class ExportResult:
    to: Path
    sources: dict[str, int] = field(default_factory=dict)  # images written per source
    reports: dict[str, int] = field(default_factory=dict)  # index entries with a report

    def to_dict(self) -> dict[str, object]:
        return {
            "to": str(self.to),
            "sources": {
                name: {
                    "images": n,
                    "reports": self.reports.get(name, 0),
                    "index": str(self.to / name / INDEX_FILE),
                }
                for name, n in self.sources.items()
            },
        }


def image_id(number: int) -> str:
    """The 6-digit id of the ``number``-th image of a source (from 0)."""
    if number >= 10**ID_DIGITS:
        raise ValueError(f"more than {10**ID_DIGITS:,} images in one source: ids run out")
    return f"{number:0{ID_DIGITS}d}"


def relative_path(identifier: str) -> str:
    return f"{identifier[:2]}/{identifier}.jpg"


def to_rgb(data: bytes) -> Image.Image:
    """The stored image as 8-bit RGB (16-bit PNGs scaled by ``>> 8``)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            pixels = np.asarray(image, dtype=np.uint32) >> 8
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")


class ExportError(ValueError):
    """A shard or member that cannot be exported (missing, damaged); the message names it."""


def _damaged(out: Path, shard: str, member: str, key: str, what: str) -> ExportError:
    return ExportError(
        f"{out / shard}: member {member} (key {key}) {what}; the collection is damaged: run "
        f"machex verify {out}"
    )


def _jpeg(out: Path, shard: str, row, data: bytes) -> bytes:
    """The member's bytes as the exported JPEG, once they hash to the manifest's sha256."""
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise _damaged(out, shard, row.member, row.key, "does not match its images sha256")
    buffer = io.BytesIO()
    try:
        to_rgb(data).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _damaged(out, shard, row.member, row.key, f"does not decode ({error})") from None
    return buffer.getvalue()


def _report(out: Path, shard: str, row, data: bytes) -> str | None:
    """The ``report`` field of the sample's ``<key>.json`` member."""
    try:
        return json.loads(data).get("report")
    except (ValueError, AttributeError) as error:
        raise _damaged(out, shard, f"{row.key}.json", row.key, f"is not JSON ({error})") from None


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # a regular member
    return handle.read()


def _export_shard(
    out: Path, shard: str, rows: pd.DataFrame, targets: dict[str, Path], on_advance
) -> dict[str, dict[str, object]]:
    """Write the images of one shard to ``targets`` (key -> path); ``{key: {"path", "report"}}``."""
    members = {row.member: row for row in rows.itertuples(index=False)}
    jsons = {f"{row.key}.json": row for row in members.values()}
    found: dict[str, dict[str, object]] = {}
    if not (out / shard).is_file():
        raise ExportError(f"{out / shard}: shard missing; run machex verify {out}")
    try:
        with tarfile.open(out / shard, mode="r:") as tar:
            for info in tar:
                if info.name in members:
                    row = members[info.name]
                    data = _jpeg(out, shard, row, _read(tar, info))
                    targets[row.key].parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(targets[row.key], data)
                    found.setdefault(row.key, {})["path"] = str(targets[row.key])
                    if on_advance:
                        on_advance(1)
                elif info.name in jsons:
                    row = jsons[info.name]
                    report = _report(out, shard, row, _read(tar, info))
                    found.setdefault(row.key, {})["report"] = report
    except (tarfile.TarError, EOFError) as error:
        raise ExportError(
            f"{out / shard}: unreadable tar ({error}); run machex verify {out}"
        ) from None
    return found


def export_index(
    out: Path,
    to: Path,
    sources: Sequence[str] | None = None,
    on_advance: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the original layout of ``sources`` (default: every built source) under ``to``.

    Each tar is read once, member by member. Existing files of the same ids are replaced; a
    source's old ``index.json`` is removed first, so an export stopped by a damaged member
    leaves no index describing other files. For a progress bar: ``on_start(images)`` with
    the number of images to export, once, before any is read, then ``on_advance(n)`` as
    they are written.
    """
    out = Path(out)
    if not (out / "manifests" / "images").is_dir():
        raise NotACollection(f"{out} holds no MaCheX build (no manifests/images/)")
    columns = ["key", "shard", "member", "sha256"]
    images = load_manifest(out, "images", sources, columns=columns)
    if on_start:
        on_start(len(images))
    if sources:
        given = [sources] if isinstance(sources, str) else list(sources)
        names = source_names(given)
        unknown = sorted(g for g, n in zip(given, names) if n not in set(images["source"]))
        if unknown:
            built = sorted(set(load_manifest(out, "images", columns=[])["source"]))
            raise ValueError(f"--source {', '.join(unknown)}: not built in {out} (built: {built})")
    make_folder(Path(to), "--to")  # before any image is read
    to = Path(to).resolve()
    result = ExportResult(to=to)
    for source, group in images.groupby("source", sort=True):
        group = group.sort_values("key", kind="stable")
        ids = {key: image_id(i) for i, key in enumerate(group["key"])}
        folder = to / source
        targets = {key: folder / relative_path(identifier) for key, identifier in ids.items()}
        (folder / INDEX_FILE).unlink(missing_ok=True)  # before its files change
        index: dict[str, dict[str, str]] = {}
        for shard, rows in group.groupby("shard", sort=True):
            found = _export_shard(out, shard, rows, targets, on_advance)
            for key in rows["key"]:
                if "path" not in found.get(key, {}):
                    raise ExportError(
                        f"{out / shard}: no image member for {key}; run machex verify {out}"
                    )
                entry = {"path": found[key]["path"], "key": key}
                if found[key].get("report"):
                    entry["report"] = found[key]["report"]
                index[ids[key]] = entry
        index = dict(sorted(index.items()))
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(index, indent=1, ensure_ascii=False) + "\n"
        write_atomic(folder / INDEX_FILE, text.encode())
        result.sources[source] = len(index)
        result.reports[source] = sum("report" in entry for entry in index.values())
    return result
