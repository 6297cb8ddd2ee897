"""``cheff encode``: a MaCheX selection's autoencoder latents, written once.

Latent diffusion trains on latents; encoding the images every step costs the encoder's forward
pass and the JPEG/PNG decoding of full-size radiographs. ``encode_collection`` does it once and
stores, per image, the posterior's **moments** (mean and log-variance, concatenated on the
channel axis like the encoder's output), so training still draws a fresh
``z = mean + std * noise`` every time it sees an image, as the official
``encode_first_stage(x).sample()`` does.

A latents folder::

    LATENTS/latents.json                 what, from where, with which AE; the latent statistics
    LATENTS/manifest.parquet             key, source, split, shard, offset, size (+ statistics)
    LATENTS/shards/latents-NNNNNN.tar    WebDataset: <key>.npy (moments) and <key>.json

``<key>.npy`` holds one float16 array of shape (2 * embed_dim, h, w): the mean's channels,
then the (clamped) log-variance's. ``<key>.json`` is the image's metadata (key, source, split,
patient, study, view). Shards are written to ``.tmp`` and renamed, a per-shard manifest part
follows each, and ``latents.json`` comes last: an interrupted encoding is resumed by running
the same command again (finished shards are kept), and a folder without ``latents.json`` is
never read as finished.

:class:`LatentDataset` reads a latents folder by member offset, like ``MaCheX``, and has what
``machex.stream.MaCheXStream`` needs, so training streams latents exactly as it streams images.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from machex.folders import write_atomic

if TYPE_CHECKING:
    from cheff.config import DataConfig
    from machex.stream import MaCheXStream

log = logging.getLogger(__name__)

FORMAT = "cheff-latents"
FORMAT_VERSION = 1
INFO_FILE = "latents.json"
MANIFEST_FILE = "manifest.parquet"
SHARD_DIR = "shards"
PARTS_DIR = "parts"  # per-shard manifest parts of an unfinished encoding
PLAN_FILE = "encode-plan.json"  # what an unfinished encoding is doing (checked on resume)
LOCK_FILE = ".encode.lock"  # held by the one encoding that writes the folder
DTYPE = "float16"
UNSCALED = 1.0  # the Cheff unconditional model's scale factor (FORMAT.md 3a)
METADATA_COLUMNS = ("key", "source", "split", "patient_id", "study_id", "view")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),  # relative to the latents folder
        ("offset", pa.int64()),  # of the .npy member's data
        ("size", pa.int64()),
        # Sums over the latent's elements, for the statistics in latents.json: of the posterior
        # mean, of its square, and of the posterior variance exp(logvar), as stored (float16).
        ("mean_sum", pa.float64()),
        ("mean_sq_sum", pa.float64()),
        ("var_sum", pa.float64()),
    ]
)


def is_latents(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a finished latents folder (it has ``latents.json``)."""
    return (Path(folder) / INFO_FILE).is_file()


def read_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``latents.json`` of a finished latents folder."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a finished latents folder (no {INFO_FILE}); an interrupted "
            "`cheff encode` resumes when run again with the same arguments"
        )
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {info.get('format')!r})")
    return info


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_parquet(path: Path, rows: pd.DataFrame | list[dict[str, Any]]) -> None:
    table = (
        pa.Table.from_pandas(rows, schema=MANIFEST_SCHEMA, preserve_index=False)
        if isinstance(rows, pd.DataFrame)
        else pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------- encoding


def encode_collection(
    ae: str | os.PathLike[str] | nn.Module,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    image_size: int = 256,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    sources: Sequence[str] | None = None,
    where: str | None = None,
    composition: str | None = None,
    exclude_holdout: str | Sequence[str] | None = None,
    shard_size: int = 1000,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every split of a MaCheX selection into the latents folder ``out``; returns it.

    ``ae``: an autoencoder checkpoint (any file ``load_autoencoder`` reads; its path and
    SHA-256 are recorded, so training can find it) or an ``AutoencoderKL`` (then training
    needs ``--ae``). Images are read as ``MaCheX(data, splits=None, image_size=image_size,
    value_range=(-1, 1))`` with the selection arguments, replicated to the AE's input channels
    and encoded in fp32 on ``device`` (default: CUDA, MPS, then the CPU). An image that
    cannot be read is logged and left out (its key is listed in ``latents.json``).

    Resumable: running the same call again after an interruption keeps the finished shards;
    a different call on an unfinished folder is refused, and so is a finished folder.
    """
    from cheff.checkpoints import load_autoencoder
    from cheff.train.loop import select_device
    from machex import MaCheX

    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "cheff encode runs as one process, not under torchrun (every rank would encode "
            "every image into the same folder); run it once, on one GPU"
        )
    if is_latents(out):
        raise ValueError(
            f"{out} already holds finished latents ({INFO_FILE}); choose another --out"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be at least 1")
    if isinstance(ae, nn.Module):
        model, ae_path, ae_sha = ae, None, None
    else:
        ae_path = Path(ae).resolve()
        model, ae_sha = load_autoencoder(ae_path), file_sha256(ae_path)
    factor = model.config.downsampling
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not a multiple of the AE's factor {factor}")
    target = select_device("auto" if device is None else str(device))  # before any file
    dataset = MaCheX(
        data,
        sources=list(sources) if sources else None,
        splits=None,
        composition=composition,
        where=where,
        exclude_holdout=exclude_holdout,
        image_size=image_size,
        value_range=(-1, 1),
        with_labels=False,
    )
    count = len(dataset)
    if count == 0:
        raise ValueError(f"the selection of {data} holds no image to encode")
    holdouts = [exclude_holdout] if isinstance(exclude_holdout, str) else exclude_holdout
    keys = [str(k) for k in dataset._keys]
    plan = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "ae": None if ae_path is None else str(ae_path),
        "ae_sha256": ae_sha,
        "autoencoder": model.config.to_dict(),
        "data": str(Path(data).resolve()),
        "sources": sorted(sources) if sources else None,
        "where": where,
        "composition": composition,
        "exclude_holdout": list(holdouts) if holdouts else None,
        "image_size": int(image_size),
        "shard_size": int(shard_size),
        "count": count,
        "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
    }
    plan = json.loads(json.dumps(plan))  # as read back from the file (tuples -> lists)
    from machex.folders import make_folder

    make_folder(out, "--out", SHARD_DIR, PARTS_DIR)  # one-line errors (a ValueError)
    with _only_encoder(out):
        return _encode(
            out, plan, dataset, keys, model, shard_size, batch_size, target, num_workers, progress
        )


@contextmanager
def _only_encoder(out: Path) -> Iterator[None]:
    """One ``cheff encode`` per folder at a time (released even on kill -9): a second one (a
    requeued job beside the first, every rank of a ``torchrun``) took the folder for a resume
    and deleted the first's unfinished shard."""
    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another cheff encode into {out} is running; wait for it (an interrupted one "
                "resumes when run again)"
            ) from None
        yield


def _encode(
    out: Path,
    plan: dict[str, Any],
    dataset: Any,
    keys: list[str],
    model: nn.Module,
    shard_size: int,
    batch_size: int,
    target: torch.device,
    num_workers: int,
    progress: bool,
) -> Path:
    """Encode what ``plan`` lists and is not done yet into ``out``; then finish the folder."""
    from cheff.train.data import SkipUnreadable, collate_readable
    from machex.shards import ShardWriter, remove_stale_temporaries

    count = len(keys)
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        changed = sorted(k for k in plan if previous.get(k) != plan[k])
        if changed:
            raise ValueError(
                f"{out} holds an unfinished encoding of another selection or autoencoder "
                f"(differs in {', '.join(changed)}); finish it with its own arguments or "
                "choose another --out"
            )
        log.info("%s: resuming an unfinished encoding", out)
    elif any((out / SHARD_DIR).iterdir()) or any((out / PARTS_DIR).iterdir()):
        raise ValueError(f"{out} holds shards but no {PLAN_FILE}; choose an empty --out")
    else:
        write_atomic(plan_path, json.dumps(plan, indent=2) + "\n")
    remove_stale_temporaries(out)

    shards = math.ceil(count / shard_size)
    stems = [f"latents-{i:06d}" for i in range(shards)]
    todo = [i for i in range(shards) if not (out / PARTS_DIR / f"{stems[i]}.parquet").is_file()]
    plan_batches = [
        (i, list(range(start, min(start + batch_size, (i + 1) * shard_size, count))))
        for i in todo
        for start in range(i * shard_size, min((i + 1) * shard_size, count), batch_size)
    ]
    model = model.to(target).eval()
    in_channels = model.config.in_channels
    meta = dataset.manifest.reindex(columns=list(METADATA_COLUMNS)).astype(object)
    meta = meta.where(meta.notna(), None)

    from tqdm import tqdm

    loader = DataLoader(
        SkipUnreadable(dataset),
        batch_sampler=[indices for _, indices in plan_batches],
        num_workers=num_workers,
        collate_fn=collate_readable,
        pin_memory=target.type == "cuda",
    )
    done = count - sum(len(indices) for _, indices in plan_batches)
    bar = tqdm(total=count, initial=done, desc="encode", unit="img", disable=not progress)
    writer: Any = None
    current, rows = -1, []
    try:
        for (shard, indices), batch in zip(plan_batches, loader):
            if shard != current:
                if writer is not None:
                    _finish_shard(out, stems[current], writer, rows)
                current, rows = shard, []
                writer = ShardWriter(out / SHARD_DIR / f"{stems[shard]}.tar")
            bar.update(len(indices))
            if batch is None:  # every image of the batch unreadable (logged)
                continue
            x = batch["image"].to(target, non_blocking=True).expand(-1, in_channels, -1, -1)
            with torch.inference_mode():
                posterior = model.encode(x.float())
                moments = torch.cat([posterior.mean, posterior.logvar], dim=1)
            moments = moments.to("cpu", torch.float16).numpy()
            position = {keys[i]: i for i in indices}
            for key, array in zip(batch["key"], moments):
                location = writer.add(f"{key}.npy", _npy_bytes(array))
                record = meta.iloc[position[key]].to_dict()
                writer.add(f"{key}.json", json.dumps(record, sort_keys=True).encode())
                half = array.shape[0] // 2
                mean = array[:half].astype(np.float64)
                rows.append(
                    {
                        "key": key,
                        "source": record["source"],
                        "split": record["split"],
                        "shard": f"{SHARD_DIR}/{stems[shard]}.tar",
                        "offset": location.offset,
                        "size": location.size,
                        "mean_sum": float(mean.sum()),
                        "mean_sq_sum": float((mean**2).sum()),
                        "var_sum": float(np.exp(array[half:].astype(np.float64)).sum()),
                    }
                )
        if writer is not None:
            _finish_shard(out, stems[current], writer, rows)
            writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()  # the unfinished shard only; finished ones stay for a resume
    return _finish(out, plan, stems, keys, model)


def _finish_shard(out: Path, stem: str, writer: Any, rows: list[dict[str, Any]]) -> None:
    """Publish the shard, then its manifest part: a part exists only for a whole shard."""
    writer.commit()
    _write_parquet(out / PARTS_DIR / f"{stem}.parquet", rows)


def _finish(
    out: Path, plan: dict[str, Any], stems: list[str], keys: list[str], model: nn.Module
) -> Path:
    """Join the parts into ``manifest.parquet``, compute the statistics, write latents.json."""
    frames = [pq.read_table(out / PARTS_DIR / f"{stem}.parquet").to_pandas() for stem in stems]
    frame = pd.concat(frames, ignore_index=True)
    skipped = sorted(set(keys) - set(frame["key"]))
    if frame.empty:
        raise ValueError(f"none of the {len(keys)} images could be read (see the log)")
    if skipped:
        log.warning("%d unreadable images left out, e.g. %s", len(skipped), skipped[:3])
    config = model.config
    side = plan["image_size"] // config.downsampling
    latent_shape = [config.embed_dim, side, side]
    elements = len(frame) * int(np.prod(latent_shape))
    mean = frame["mean_sum"].sum() / elements
    mean_sq = frame["mean_sq_sum"].sum() / elements
    var = frame["var_sum"].sum() / elements
    # z ~ q(z | x) over the set: Var z = E[mean^2] + E[var] - E[z]^2 (total variance).
    std = math.sqrt(max(mean_sq + var - mean**2, 0.0))
    std_of_means = math.sqrt(max(mean_sq - mean**2, 0.0))
    _write_parquet(out / MANIFEST_FILE, frame)
    info = {
        **{k: v for k, v in plan.items() if k not in ("shard_size", "count", "keys_sha256")},
        "stored": "moments",
        "moments_shape": [2 * config.embed_dim, side, side],
        "latent_shape": latent_shape,
        "dtype": DTYPE,
        "count": len(frame),
        "skipped": skipped,
        "shards": len(stems),
        "shard_size": plan["shard_size"],
        "latent_mean": mean,
        "latent_std": std,
        "latent_std_of_means": std_of_means,
        "scale_by_std": 1.0 / std if std > 0 else None,
        "scale_factor": UNSCALED,
        "scale_factor_note": (
            "training uses its config's scale_factor: 1.0 by default, the Cheff unconditional "
            "model's; scale_by_std = 1 / latent_std (the std of posterior samples over this "
            "set) is what latent diffusion's scale_by_std would set"
        ),
    }
    write_atomic(out / INFO_FILE, json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- reading


def source_collection(info: dict[str, Any], moved_to: str | os.PathLike[str] | None) -> Path:
    """The MaCheX a latents folder was encoded from: ``moved_to`` when given (the collection
    was moved, e.g. to a cluster's scratch), else the path ``latents.json`` records; an error
    saying so when no built collection is there."""
    root = Path(moved_to or info.get("data") or "")
    if not (root / "manifests").is_dir():
        hint = "" if moved_to else f" (where {INFO_FILE} says they were encoded from)"
        raise ValueError(
            f"the latents' MaCheX {root}{hint} is not a built collection: if it moved, give "
            "its new place (--machex DIR, data.machex)"
        )
    return root


class LatentDataset(Dataset):
    """A latents folder as a map-style dataset: items ``{"key", "source", "moments"}``.

    ``moments`` is the stored float16 tensor (2 * embed_dim, h, w); ``DiagonalGaussian.
    from_moments(moments[None].float())`` gives the posterior back. Members are read by
    offset (no tar scan). ``sources`` narrows the selection, and ``composition`` (a named
    one, e.g. ``paper-2023``) to its (source, split) pairs; ``exclude_keys`` drops keys (a
    held-out set that was not left out when encoding); ``keys`` keeps only those.
    ``MaCheXStream(LatentDataset(...))`` streams it, seeded and resumable, like a ``MaCheX``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        sources: str | Sequence[str] | None = None,
        exclude_keys: Sequence[str] | None = None,
        keys: Collection[str] | None = None,
        composition: str | None = None,
    ) -> None:
        self.root = Path(folder)
        self.info = read_info(self.root)
        frame = pq.read_table(self.root / MANIFEST_FILE).to_pandas()
        if sources:
            from machex.manifests import source_names

            wanted = source_names(sources)  # aliases (nih) as in MaCheX
            unknown = sorted(set(wanted) - set(frame["source"]))
            if unknown:
                raise ValueError(
                    f"{self.root} holds no latents of {unknown}; it has "
                    f"{sorted(frame['source'].unique())}"
                )
            frame = frame[frame["source"].isin(wanted)]
        if composition is not None:
            from machex.manifests import in_composition
            from machex.tables import load_composition

            frame = frame[in_composition(frame, load_composition(composition))]
        if exclude_keys is not None:
            frame = frame[~frame["key"].isin(set(exclude_keys))]
        if keys is not None:
            frame = frame[frame["key"].isin(set(keys))]
        self.manifest = frame.reset_index(drop=True)
        names, index = np.unique(self.manifest["shard"].to_numpy(dtype=str), return_inverse=True)
        self._shards: list[Path] = [self.root / name for name in names]
        self._shard_index = index.astype(np.int32)
        self._offsets = self.manifest["offset"].to_numpy(dtype=np.int64)
        self._sizes = self.manifest["size"].to_numpy(dtype=np.int64)
        self._keys = self.manifest["key"].to_numpy(dtype=str)
        self._sources = self.manifest["source"].to_numpy(dtype=str)
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard there and long enough for its members: a partial copy of a folder
        (latents.json and some shards) trained on what was left, skipping the rest."""
        ends = np.zeros(len(self._shards), dtype=np.int64)
        np.maximum.at(ends, self._shard_index, self._offsets + self._sizes)
        for shard, end in zip(self._shards, ends.tolist()):
            size = shard.stat().st_size if shard.is_file() else None
            if size is None or size < end:
                found = "missing" if size is None else f"{size:,} bytes, its members end at {end:,}"
                raise ValueError(
                    f"{shard}: {found}; the latents folder {self.root} is incomplete (copied "
                    "in part?): copy it again, or encode again"
                )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.info["latent_shape"])

    @classmethod
    def stream(
        cls,
        folder: str | os.PathLike[str],
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        batch_size: int = 1,
        **selection: Any,
    ) -> MaCheXStream:
        """The selection as a seeded, resumable ``MaCheXStream`` (as ``MaCheX.stream``)."""
        from machex.stream import MaCheXStream

        return MaCheXStream(
            cls(folder, **selection),
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            batch_size=batch_size,
        )

    def __len__(self) -> int:
        return len(self._keys)

    def read_moments(self, index: int) -> np.ndarray:
        from machex.shards import read_member

        shard = self._shards[int(self._shard_index[index])]
        data = read_member(shard, int(self._offsets[index]), int(self._sizes[index]))
        return np.load(io.BytesIO(data), allow_pickle=False)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return {
            "key": str(self._keys[index]),
            "source": str(self._sources[index]),
            "moments": torch.from_numpy(self.read_moments(index)),
        }


def open_latent_stream(
    folder: str | os.PathLike[str],
    config: DataConfig,
    batch_size: int,
    seed: int,
    exclude_keys: Sequence[str] | None = None,
    keys: Collection[str] | None = None,
) -> MaCheXStream:
    """The training stream of a latents folder (``config``: sources, composition and shuffle
    buffer; ``where`` selects when encoding, so a run that sets one needs a folder encoded with
    it; ``keys``: only those). A composition is applied here by (source, split), exactly as
    when encoding, unless the folder was encoded with another one."""
    from cheff.train.data import SkipUnreadable, pinned_rank, several_ranks
    from machex.stream import MaCheXStream

    encoded = read_info(folder)
    for name, allowed in (("where", ()), ("composition", (None,))):
        wanted = getattr(config, name)
        if wanted and encoded.get(name) not in (wanted, *allowed):
            raise ValueError(
                f"data.{name} {wanted!r} selects images when encoding, and {folder} was "
                f"encoded with {name} {encoded.get(name)!r}: encode with `cheff encode "
                f"--{name} {wanted}`, or train on this folder with --set data.{name}=none"
            )
    dataset = LatentDataset(
        folder,
        sources=list(config.sources) or None,
        exclude_keys=exclude_keys,
        keys=keys,
        composition=config.composition,
    )
    if len(dataset) == 0:
        raise ValueError(f"the selection of {folder} holds no latents to train on")
    stream = MaCheXStream(
        dataset,
        seed=seed,
        shuffle_buffer=config.shuffle_buffer,
        batch_size=batch_size,
        drop_last=several_ranks(),
        **pinned_rank(),
    )
    stream.dataset = SkipUnreadable(stream.dataset)
    return stream
