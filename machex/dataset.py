"""``MaCheX``: a map-style torch ``Dataset`` over a built collection (``machex build --out``).

Every item is read straight from its tar shard at the manifest's ``offset`` and ``size``: no
unpacking, no index scan. Shard files are opened lazily in each process (the inherited ones
closed and reopened after a fork), never pickled, so the dataset works with
``DataLoader(num_workers > 0)`` under both the fork and the spawn start methods, and read with
``os.pread`` (no shared file offset), so threads may share one dataset. See
``docs/dataset.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from machex.stream import MaCheXStream

from machex.manifests import built_sources, in_composition, load_manifest, source_names
from machex.records import FINDINGS
from machex.resampling import resize
from machex.shards import padded
from machex.tables import load_composition

__all__ = ["MaCheX", "collate", "holdout_path", "list_holdouts"]

#: Where ``machex holdout`` stores a held-out set (columns ``key, source, patient_id``).
HOLDOUT_DIR = Path("manifests") / "holdouts"
#: Open shard files kept per process (least recently used closed first).
_MAX_OPEN_SHARDS = 64

Where = str | Callable[[pd.DataFrame], "pd.Series[bool]"] | pc.Expression


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


#: Serialises the after-fork reset of a dataset's open shards; made anew in a forked child,
#: where a copy held by another parent thread would stay locked for ever.
_FORK_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_new_fork_lock)


class _Shard:
    """An open shard file: a raw descriptor read with ``os.pread``, which takes no shared
    file offset, so one descriptor serves every thread. ``readers`` counts the reads in
    flight: an evicted shard is closed by the last of them, never under a reader (its
    descriptor number could be reused by another file)."""

    __slots__ = ("evicted", "fd", "readers")

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)  # not inheritable by exec'd children
        self.readers = 0
        self.evicted = False


class _DefaultSplits(str):
    """The default ``splits="train"``, told apart from an explicit ``"train"``: with a
    ``composition`` the default gives way to the composition's own splits."""

    __slots__ = ()


_DEFAULT_SPLITS = _DefaultSplits("train")


def holdout_path(root: Path, name: str) -> Path:
    return Path(root) / HOLDOUT_DIR / f"{name}.parquet"


def list_holdouts(root: Path) -> list[str]:
    """The names of the held-out sets stored in the collection: complete ones only (a set is
    written parquet first, then its JSON sidecar; see :mod:`machex.holdout`)."""
    from machex.holdout import list_holdouts as complete  # lazy: it imports the build code

    return complete(Path(root))


def _read_holdout(
    root: Path,
    name: str,
    *,
    stacklevel: int,
    images: pd.DataFrame | None = None,
    sources: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Held-out set ``name``'s rows and JSON sidecar, with a warning when the images it was
    drawn from changed since (it is used as drawn: the user should know). ``images``: the
    images manifest of ``sources`` (None: every source) as loaded, unfiltered, which spares
    reading it again where it holds the sources the set was drawn from."""
    from machex.holdout import collection_change, load_holdout, load_holdout_info

    path = holdout_path(root, name)
    if not path.is_file():
        raise ValueError(
            f"no held-out set {name!r} in {Path(root) / HOLDOUT_DIR}; "
            f"available: {list_holdouts(root)}"
        )
    info = load_holdout_info(Path(root), name)
    held = load_holdout(Path(root), name)
    change = collection_change(Path(root), name, held, info, images, images_sources=sources)
    if change:
        warnings.warn(change, UserWarning, stacklevel=stacklevel + 1)
    return held, info


def _warn_unfinished(root: Path, images: pd.DataFrame) -> None:
    """Warn when a source's build is not complete (interrupted, or still running): its
    images are a part of the source, not a deterministic selection of it. A warning, not a
    refusal (``machex holdout`` refuses): a partial collection may be used on purpose."""
    from machex.build import BuildError
    from machex.holdout import unfinished_by_kind  # lazy: it imports the build code

    counts = images["source"].value_counts()
    try:
        running, parts = unfinished_by_kind(root, counts.index)
    except BuildError:  # an unreadable build.json: `machex stats` says so, not a dataset
        return
    running = [f"{s} ({int(counts[s]):,} images so far)" for s in running]
    parts = [f"{s} ({int(counts[s]):,} images so far)" for s in parts]
    if running:
        warnings.warn(
            f"{root}: the build of {', '.join(running)} is not complete, so this dataset "
            "holds only part of it; re-run the same `machex build` command to finish it",
            UserWarning,
            stacklevel=3,
        )
    if parts:
        warnings.warn(
            f"{root}: the --part runs of {', '.join(parts)} are not merged, so this dataset "
            "may hold only part of it; run every part (`machex build ... --part I/N`), then "
            f"`machex merge {root}`",
            UserWarning,
            stacklevel=3,
        )


class MaCheX(Dataset):
    """A built MaCheX collection as a map-style dataset.

    Args:
        root: the ``--out`` folder of ``machex build``.
        sources: a source name or a list of them (default: every built source); the
            aliases ``machex build --source`` accepts (``nih``) work too. A name the
            collection does not hold, or one the ``composition`` leaves out, is a
            ``ValueError``.
        splits: a split name (``train``, ``val``, ``test``) or a list of them, ``None`` for
            every split; the name of a held-out set (``OUT/manifests/holdouts/<NAME>.parquet``)
            selects exactly the keys it was drawn with (images built later are never
            added). With a ``composition`` the default gives way to the composition's
            splits; an explicit value narrows them.
        composition: a named composition (``paper-2023``): only its (source, split) pairs.
        where: a filter over the images table joined with the labels table: a pandas query
            string (backtick names with spaces: ``"`Pleural Effusion` == 1"``), a callable
            ``DataFrame -> bool Series``, or a ``pyarrow.compute`` expression. Null results
            count as False.
        exclude_holdout: the name (or names) of held-out sets to leave out: their images
            and, for a set drawn by patient, every image of its patients (also those built
            after the draw). A set drawn from other images than the collection holds now is
            used as drawn, with a ``UserWarning`` saying what changed.
        keys: only these image keys (e.g. the images that have a report), with the rest of
            the selection applied too.
        image_size: the side of the returned images; other sizes are resized with
            ``machex.resize`` (antialiased bicubic).
        transform: applied to the image tensor after resizing and scaling.
        value_range: ``(low, high)`` the pixel range maps onto (black -> low, white -> high).
        with_labels, with_reports, with_boxes: which optional fields items carry.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        sources: str | Sequence[str] | None = None,
        splits: str | Sequence[str] | None = _DEFAULT_SPLITS,
        composition: str | None = None,
        where: Where | None = None,
        exclude_holdout: str | Sequence[str] | None = None,
        image_size: int = 1024,
        transform: Callable[[torch.Tensor], Any] | None = None,
        value_range: tuple[float, float] = (0, 1),
        with_labels: bool = True,
        with_reports: bool = False,
        with_boxes: bool = False,
        keys: Collection[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not (self.root / "manifests" / "images").is_dir():
            raise ValueError(f"{self.root} is not a built MaCheX collection (no manifests/images)")
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive whole number, got {image_size!r}")
        self.image_size = int(image_size)
        self.transform = transform
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.with_labels = with_labels
        self.with_reports = with_reports
        self.with_boxes = with_boxes
        self.label_names: list[str] = list(FINDINGS)

        source_list = None if sources is None else self._check_sources(sources)
        pairs = load_composition(composition) if composition is not None else None
        if pairs is not None:
            wanted = {s for s, _ in pairs}
            left_out = [s for s in source_list or () if s not in wanted]
            if left_out:
                raise ValueError(
                    f"sources {left_out} are not in composition {composition!r}, which holds "
                    f"{sorted(wanted)}; leave sources out or name some of those"
                )
            source_list = source_list or sorted(wanted)
        images = load_manifest(self.root, "images", source_list)
        _warn_unfinished(self.root, images)
        labels = load_manifest(self.root, "labels", source_list).drop(columns=["native_labels"])
        frame = images.merge(labels, on=["key", "source"], how="left", sort=False)

        mask = pd.Series(True, index=frame.index)
        if pairs is not None:
            mask &= in_composition(frame, pairs)
        if splits is not None and not (pairs is not None and isinstance(splits, _DefaultSplits)):
            names = [splits] if isinstance(splits, str) else splits
            mask &= self._split_mask(frame, names, images, source_list)
        from machex.holdout import kept_out  # lazy: it imports the build code

        for name in (
            [exclude_holdout] if isinstance(exclude_holdout, str) else exclude_holdout or ()
        ):
            held, info = _read_holdout(
                self.root, name, stacklevel=2, images=images, sources=source_list
            )
            mask &= ~kept_out(frame, held, info.get("by"))
        if keys is not None:
            mask &= frame["key"].isin(set(keys))
        frame = frame[mask.to_numpy()]
        if where is not None:
            frame = frame[_where_mask(frame, where)]
        frame = frame.reset_index(drop=True)

        self.manifest: pd.DataFrame = frame[list(images.columns)].copy()
        # Per-item columns as numpy arrays (no Python objects to refcount in forked workers).
        shard_index, shard_names = pd.factorize(frame["shard"], sort=True)  # np.unique: 30x
        self._shards: list[str] = [str(self.root / name) for name in shard_names]
        self._shard_index = shard_index.astype(np.int32)
        self._offsets = frame["offset"].to_numpy(dtype=np.int64)
        self._sizes = frame["size"].to_numpy(dtype=np.int64)
        self._keys = frame["key"].to_numpy(dtype=str)
        self._sources = frame["source"].to_numpy(dtype=str)
        self._max_values = np.where(frame["encoding"].to_numpy(dtype=str) == "png16", 65535, 255)
        self._labels = (
            frame[list(FINDINGS)].astype("float32").to_numpy(dtype=np.float32, na_value=np.nan)
            if len(frame)
            else np.zeros((0, len(FINDINGS)), np.float32)
        )
        self._boxes: dict[str, tuple[np.ndarray, list[str]]] = (
            self._load_boxes(source_list) if with_boxes else {}
        )
        self._handles: OrderedDict[int, _Shard] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @classmethod
    def stream(
        cls,
        root: str | os.PathLike[str],
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch: int = 0,
        start: int = 0,
        batch_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        **selection: Any,
    ) -> MaCheXStream:
        """The same selection (``selection``: the ``MaCheX`` arguments) as a resumable,
        rank- and worker-split ``IterableDataset``: see ``machex.stream.MaCheXStream``."""
        from machex.stream import MaCheXStream

        return MaCheXStream(
            cls(root, **selection),
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            epoch=epoch,
            start=start,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )

    # -- selection -------------------------------------------------------------------------

    def _check_sources(self, sources: str | Sequence[str]) -> list[str]:
        """``sources`` as built source names (aliases resolved). An unknown or unbuilt name
        is an error: left out silently, it would give a dataset without that source."""
        given = [sources] if isinstance(sources, str) else list(sources)
        names = source_names(given)
        built = built_sources(self.root)
        missing = [g for g, n in zip(given, names) if n not in built]
        if missing:
            raise ValueError(
                f"sources {missing} are not built in {self.root}, which holds {built} "
                "(give those names, or aliases such as 'nih')"
            )
        return names

    def _split_mask(
        self,
        frame: pd.DataFrame,
        names: Sequence[str],
        images: pd.DataFrame | None = None,
        sources: Sequence[str] | None = None,
    ) -> pd.Series:
        holdouts = set(list_holdouts(self.root))
        known = set(frame["split"].dropna().unique()) | {"train", "val", "test"}
        mask = pd.Series(False, index=frame.index)
        for name in names:
            if name in holdouts:
                held, _ = _read_holdout(
                    self.root, name, stacklevel=3, images=images, sources=sources
                )
                mask |= frame["key"].isin(held["key"])
            elif name in known:
                mask |= frame["split"] == name
            else:
                raise ValueError(
                    f"unknown split or held-out set {name!r}; splits: {sorted(known)}, "
                    f"held-out sets: {sorted(holdouts)}"
                )
        return mask

    def _load_boxes(self, sources: Sequence[str] | None) -> dict[str, tuple[np.ndarray, list[str]]]:
        boxes = load_manifest(self.root, "bboxes", sources)
        boxes = boxes[boxes["key"].isin(set(self._keys.tolist()))]
        out: dict[str, tuple[np.ndarray, list[str]]] = {}
        for key, group in boxes.groupby("key", sort=False):
            x, y = group["x"].to_numpy(np.float32), group["y"].to_numpy(np.float32)
            w, h = group["width"].to_numpy(np.float32), group["height"].to_numpy(np.float32)
            out[str(key)] = (np.stack([x, y, x + w, y + h], axis=1), group["label"].tolist())
        return out

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # never pickle open files
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """In a forked child: close the inherited descriptors (the child's copies; the
        parent's stay open) and start afresh, with a new lock (the inherited one may have
        been held by a parent thread that does not exist here)."""
        with _FORK_LOCK:
            if self._pid == os.getpid():  # another thread of this child did it
                return
            inherited = list(self._handles.values())
            self._lock = threading.Lock()
            self._handles = OrderedDict()
            for handle in inherited:
                os.close(handle.fd)
            self._pid = os.getpid()

    def _acquire(self, shard: int) -> _Shard:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            handle = self._handles.get(shard)
            if handle is None:
                if len(self._handles) >= _MAX_OPEN_SHARDS:
                    oldest = self._handles.popitem(last=False)[1]
                    oldest.evicted = True
                    if not oldest.readers:
                        os.close(oldest.fd)
                handle = self._handles[shard] = _Shard(self._shards[shard])
            else:
                self._handles.move_to_end(shard)
            handle.readers += 1
            return handle

    def _release(self, handle: _Shard) -> None:
        with self._lock:
            handle.readers -= 1
            if handle.evicted and not handle.readers:
                os.close(handle.fd)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._acquire(shard)
        try:
            data = os.pread(handle.fd, size, offset)  # atomic: no seek, no shared offset
            while 0 < len(data) < size:  # a short read (very large member): read on
                more = os.pread(handle.fd, size - len(data), offset + len(data))
                if not more:
                    break
                data += more
        finally:
            self._release(handle)
        if len(data) != size:
            raise OSError(
                f"{self._shards[shard]}: member at offset {offset} is truncated "
                f"(read {len(data)} of {size} bytes)"
            )
        return data

    def read_bytes(self, index: int) -> bytes:
        """The encoded image bytes of item ``index``, exactly as the build wrote them."""
        return self._read(
            int(self._shard_index[index]), int(self._offsets[index]), int(self._sizes[index])
        )

    def read_json(self, index: int) -> dict[str, Any]:
        """The sample's JSON member (it follows the image member in the shard)."""
        shard = int(self._shard_index[index])
        position = int(self._offsets[index]) + padded(int(self._sizes[index]))
        name = None
        while True:
            header = self._read(shard, position, tarfile.BLOCKSIZE)
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            position += tarfile.BLOCKSIZE
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                name = self._read(shard, position, info.size).rstrip(b"\0").decode()
                position += padded(info.size)
                continue
            name = name or info.name
            break
        if name != f"{self._keys[index]}.json":
            raise OSError(f"{self._shards[shard]}: expected {self._keys[index]}.json, found {name}")
        return json.loads(self._read(shard, position, info.size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        data = self.read_bytes(index)
        with Image.open(io.BytesIO(data)) as decoded:
            pixels = _pixels(decoded)
        image = torch.from_numpy(pixels.astype(np.float32) / float(self._max_values[index]))
        stored = image.shape
        image = resize(image, self.image_size)[None]
        low, high = self.value_range
        if (low, high) != (0.0, 1.0):
            image = image * (high - low) + low
        key = str(self._keys[index])
        item: dict[str, Any] = {
            "image": self.transform(image) if self.transform is not None else image,
            "key": key,
            "source": str(self._sources[index]),
        }
        if self.with_labels:
            item["labels"] = torch.from_numpy(self._labels[index].copy())
        if self.with_reports:
            item["report"] = self.read_json(index).get("report") or ""
        if self.with_boxes:
            boxes, names = self._boxes.get(key, (np.zeros((0, 4), np.float32), []))
            scale = np.array(
                [self.image_size / stored[1], self.image_size / stored[0]] * 2, dtype=np.float32
            )
            item["boxes"] = torch.from_numpy(boxes * scale)
            item["box_labels"] = list(names)
        return item

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            with contextlib.suppress(OSError):  # in a forked child: its own copies
                os.close(handle.fd)


def _pixels(image: Image.Image) -> np.ndarray:
    """A 2-D array of the stored values: ``L`` (8-bit), ``I;16``/``I`` (16-bit PNG), or the
    grey of an RGB image (``--compat machex-v1``: three equal channels)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image.convert("I") if image.mode == "I;16B" else image)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image)


def _where_mask(frame: pd.DataFrame, where: Where) -> np.ndarray:
    """Boolean row mask of ``where`` over ``frame``; nulls count as False."""
    if isinstance(where, pc.Expression):
        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        table = table.append_column("__row", pa.array(np.arange(len(frame), dtype=np.int64)))
        rows = table.filter(where).column("__row").to_numpy()
        mask = np.zeros(len(frame), dtype=bool)
        mask[rows] = True
        return mask
    if isinstance(where, str):
        try:
            result = frame.eval(where)
        except Exception as error:  # noqa: BLE001 - any eval error is the user's expression
            raise ValueError(
                f"where={where!r}: {type(error).__name__}: {error} (a pandas query over the "
                f"columns {sorted(map(str, frame.columns))})"
            ) from None
        if isinstance(result, pd.DataFrame):  # eval of "a = b" assigns a column
            raise ValueError(
                f"where={where!r} is an assignment, not a condition: compare with '==' "
                '(e.g. "Cardiomegaly == 1")'
            )
    elif callable(where):
        result = where(frame)
    else:
        raise TypeError(
            "where: a pandas query string, a callable or a pyarrow Expression, "
            f"got {type(where).__name__}"
        )
    if isinstance(result, pd.DataFrame):
        raise ValueError(
            f"where gave a table of {result.shape[1]} columns; expected one boolean per row"
        )
    if not isinstance(result, pd.Series):
        result = pd.Series(result, index=frame.index)
    if len(result) != len(frame):
        raise ValueError(f"where gave {len(result)} values for {len(frame)} rows")
    if not result.index.equals(frame.index):  # lined up by label, as pandas' frame[mask]
        if result.index.has_duplicates or set(result.index) != set(frame.index):
            raise ValueError(
                "where gave a Series whose index is not the frame's: return a condition on "
                "the frame it is given (e.g. f['Edema'] == 1)"
            )
        result = result.reindex(frame.index)
    return result.astype("boolean").fillna(False).to_numpy(dtype=bool)


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``MaCheX`` items: images and labels stacked, ``key``/``source``/``report`` as
    lists, ``boxes`` as a list of ``[N_i, 4]`` tensors and ``box_labels`` as a list of lists.
    A field missing from any item is left out; other tensors of one shape are stacked."""
    if not batch:
        return {}
    fields = [name for name in batch[0] if all(name in item for item in batch)]
    out: dict[str, Any] = {}
    for name in fields:
        values = [item[name] for item in batch]
        if name in ("boxes", "box_labels"):
            out[name] = values
        elif all(isinstance(v, torch.Tensor) for v in values) and (
            len({tuple(v.shape) for v in values}) == 1
        ):
            out[name] = torch.stack(values)
        else:
            out[name] = values
    return out
