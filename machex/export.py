"""Export a built collection in the original MaCheX folder layout, for the original Cheff code.

One folder per source: ``<DIR>/<source>/NN/NNNNNN.jpg`` (an RGB JPEG, quality 95; ``NNNNNN``
a 6-digit running id per source in key order, ``NN`` its first two digits) and
``<DIR>/<source>/index.json`` mapping each id to ``{"path": absolute path, "key": key}``,
plus ``"report"`` (the sample's conditioning text, the ``report`` field of its ``<key>.json``
member) where the sample has one (MIMIC-CXR).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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


def export_index(
    out: Path,
    to: Path,
    sources: Sequence[str] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the original layout of ``sources`` (default: every built source) under ``to``.

    Each tar is read once, member by member. Existing files of the same ids are replaced.
    """
    out = Path(out)
    if not (out / "manifests" / "images").is_dir():
        raise NotACollection(f"{out} holds no MaCheX build (no manifests/images/)")
    images = load_manifest(out, "images", sources)
    if sources:
        given = [sources] if isinstance(sources, str) else list(sources)
        names = source_names(given)
        unknown = sorted(g for g, n in zip(given, names) if n not in set(images["source"]))
        if unknown:
            built = sorted(set(load_manifest(out, "images")["source"]))
            raise ValueError(f"--source {', '.join(unknown)}: not built in {out} (built: {built})")
    make_folder(Path(to), "--to")  # before any image is read
    to = Path(to).resolve()
    result = ExportResult(to=to)
    for source, group in images.groupby("source", sort=True):
        group = group.sort_values("key", kind="stable")
        ids = {key: image_id(i) for i, key in enumerate(group["key"])}
        folder = to / source
        index: dict[str, dict[str, str]] = {}
        for shard, rows in group.groupby("shard", sort=True):
            members = {row.member: row.key for row in rows.itertuples(index=False)}
            jsons = {f"{key}.json": key for key in members.values()}
            found: dict[str, dict[str, object]] = {}
            if not (out / shard).is_file():
                raise ValueError(f"{out / shard}: shard missing; run machex verify")
            with tarfile.open(out / shard, mode="r:") as tar:
                for info in tar:
                    if info.name in members:
                        key = members[info.name]
                        identifier = ids[key]
                        target = folder / relative_path(identifier)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        handle = tar.extractfile(info)
                        assert handle is not None
                        buffer = io.BytesIO()
                        to_rgb(handle.read()).save(buffer, format="JPEG", quality=JPEG_QUALITY)
                        write_atomic(target, buffer.getvalue())
                        found.setdefault(key, {})["path"] = str(target)
                        if on_advance:
                            on_advance(1)
                    elif info.name in jsons:
                        handle = tar.extractfile(info)
                        assert handle is not None
                        sample = json.loads(handle.read())
                        found.setdefault(jsons[info.name], {})["report"] = sample.get("report")
            for key in members.values():
                if "path" not in found.get(key, {}):
                    raise ValueError(f"{out / shard}: no image member for {key}; run machex verify")
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
