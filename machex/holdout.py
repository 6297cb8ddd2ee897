"""Named held-out sets: images kept out of training, drawn reproducibly from a built collection.

The paper trains its autoencoder and super-resolution models on all of MaCheX except a test
set of 25,000 images drawn at random by image (seed 1337; 10,000 for the report model). A
held-out set here is a manifest table, never a change to the shards::

    OUT/manifests/holdouts/<NAME>.parquet   # key, source, patient_id; sorted by key
    OUT/manifests/holdouts/<NAME>.json      # how it was drawn, and its leakage report

By default whole patients are held out (``by="patient"``), so no held-out patient has an image
in training; ``by="image"`` is the paper's way, and its leakage report shows how many patients
straddle the two sides. Patients are per source (``source`` + ``patient_id``): ids of different
datasets may coincide. An image without a patient id counts as its own patient.

A set keeps the keys it was drawn with, whatever is built later, so that evaluations on it stay
comparable. Training (``MaCheX(exclude_holdout=...)``, by ``kept_out``) leaves out its images
and, by patient, every image of its patients, also those built after the draw (e.g. by
``--retry-failed``): those are then in neither the set nor training. ``collection_change`` says
when the images drawn from are no longer those of the draw.

With a ``composition`` (``paper-2023``: the paper's MaCheX) only the images of its (source, split)
pairs are drawn from, so the held-out set lies inside the collection the paper trains on, as
``MaCheX(root, composition=...)`` selects it.

The draw depends only on the seed, the size and the keys of the images drawn from (sorted), not
on file order, worker count or shard size.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from machex import __version__
from machex.adapters import ALIASES
from machex.build import unfinished_sources
from machex.manifests import in_composition, load_manifest, source_names
from machex.parts import sources_with_parts
from machex.tables import TableError, load_composition

HOLDOUT_DIR = "holdouts"
#: Bumped whenever the parquet columns or the JSON fields change meaning.
HOLDOUT_FORMAT = 1
DEFAULT_SEED = 1337
SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("patient_id", pa.string())])
#: The sources' own split names, and "none" (``--holdout none``: leave no set out).
RESERVED_NAMES = frozenset({"train", "val", "test", "none"})
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class HoldoutError(ValueError):
    """A held-out set cannot be made or read as asked (exit code 2); says what to do."""


class By(str, Enum):
    """The unit drawn: whole patients (no patient on both sides) or single images (the paper)."""

    patient = "patient"
    image = "image"


@dataclass
class HoldoutResult:
    """What ``make_holdout`` drew and wrote."""

    name: str
    size_requested: int
    size: int  # images held out (by patient: may exceed the request by part of one patient)
    seed: int
    by: str
    sources: list[str]  # the sources drawn from
    composition: str | None  # the composition whose (source, split) pairs were drawn from
    collection_images: int  # images of those sources (in the composition's pairs)
    collection_patients: int
    collection_sha256: str  # of the sorted keys drawn from: tells whether the collection changed
    leakage: dict[str, object]
    path: Path  # the parquet file
    frame: pd.DataFrame = field(repr=False)  # key, source, patient_id of the held-out images

    def to_dict(self) -> dict[str, object]:
        """The JSON sidecar's content (and ``machex holdout --json``), without the rows."""
        return {
            "name": self.name,
            "format": HOLDOUT_FORMAT,
            "size_requested": self.size_requested,
            "size": self.size,
            "seed": self.seed,
            "by": self.by,
            "sources": self.sources,
            "composition": self.composition,
            "collection_images": self.collection_images,
            "collection_patients": self.collection_patients,
            "collection_sha256": self.collection_sha256,
            "leakage": self.leakage,
            "path": str(self.path),
        }


def holdout_dir(out: Path) -> Path:
    return Path(out) / "manifests" / HOLDOUT_DIR


def holdout_paths(out: Path, name: str) -> tuple[Path, Path]:
    """The parquet file and the JSON sidecar of held-out set ``name``."""
    check_name(name)
    folder = holdout_dir(out)
    return folder / f"{name}.parquet", folder / f"{name}.json"


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise HoldoutError(
            f"holdout name {name!r} must be letters, digits, '_' or '-' only (e.g. test-25k)"
        )
    if name.lower() in RESERVED_NAMES:
        raise HoldoutError(
            f"holdout name {name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))}: split "
            "names, and `none` for no held-out set); choose another, e.g. holdout-25k"
        )


def list_holdouts(out: Path) -> list[str]:
    """Names of the held-out sets of ``out`` (both files present), sorted."""
    folder = holdout_dir(out)
    if not folder.is_dir():
        return []
    return sorted(
        p.stem
        for p in folder.glob("*.parquet")
        if _NAME.fullmatch(p.stem) and p.with_suffix(".json").is_file()
    )


def load_holdout(out: Path, name: str) -> pd.DataFrame:
    """The held-out set ``name``: ``key``, ``source``, ``patient_id``, sorted by key."""
    parquet, _ = holdout_paths(out, name)
    if not parquet.is_file():
        known = list_holdouts(out)
        raise HoldoutError(
            f"{out} has no holdout {name!r}; "
            + (f"it has {known}" if known else "make one with `machex holdout`")
        )
    return pq.read_table(parquet, schema=SCHEMA).to_pandas()


def load_holdout_info(out: Path, name: str) -> dict[str, object]:
    """The JSON sidecar of held-out set ``name``: how it was drawn (``by``, ``sources``,
    ``collection_sha256``, ...); a set without one was never finished, so it is refused."""
    _, sidecar = holdout_paths(out, name)
    if not sidecar.is_file():
        raise HoldoutError(
            f"held-out set {name!r} has no {sidecar} (its writing was interrupted); make it "
            f"again with `machex holdout {out} --name {name} ... --overwrite`"
        )
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HoldoutError(
            f"{sidecar} is not valid JSON ({error}); restore it, or make held-out set {name!r} "
            "again with `machex holdout ... --overwrite`"
        ) from None
    if not isinstance(info, dict):
        raise HoldoutError(f"{sidecar} holds no JSON object; restore it or make the set again")
    return info


def kept_out(frame: pd.DataFrame, held: pd.DataFrame, by: str | None) -> np.ndarray:
    """Which rows of ``frame`` (``key``, ``source``, ``patient_id``) training must leave out
    for held-out set ``held``: its images and, ``by`` patient, every image of its patients,
    so that images built after the draw (e.g. by ``--retry-failed``) do not leak them into
    training. Without ``by`` (a set written by hand) only its keys."""
    mask = frame["key"].isin(held["key"]).to_numpy(dtype=bool)
    if by == By.patient.value and len(frame) and len(held):
        patients = pd.MultiIndex.from_frame(_units(held))
        mask = mask | pd.MultiIndex.from_frame(_units(frame)).isin(patients)
    return mask


def collection_change(
    out: Path,
    name: str,
    held: pd.DataFrame,
    info: dict[str, object],
    images: pd.DataFrame | None = None,
    *,
    images_sources: Collection[str] | None = None,
) -> str | None:
    """What differs between the images held-out set ``name`` was drawn from and those its
    sources (in its composition) hold now, as a warning; None when they are the same, or the
    sidecar records no ``collection_sha256``. A set drawn from other images may no longer be
    the test set one meant, so the user is told, never left to find out.

    ``images``: the images manifest as the caller already loaded it (at least ``key``,
    ``source``, ``split``, ``patient_id``), every image of ``images_sources`` (None: of every
    source), filtered in no other way; used instead of reading the manifest again where it
    holds every source the set was drawn from (the others are dropped here)."""
    recorded = info.get("collection_sha256")
    if not recorded:
        return None
    sources = info.get("sources")
    composition = info.get("composition")
    try:
        images = _drawn_images(images, images_sources, sources)
        if images is None:
            images = load_manifest(
                out,
                "images",
                sources,  # type: ignore[arg-type]
                columns=_CHANGE_COLUMNS,
            )
        if composition is not None:
            images = images[in_composition(images, load_composition(str(composition)))]
    except TableError as error:  # its composition is no longer known
        return f"held-out set {name!r}: cannot tell whether its collection changed ({error})"
    if _fingerprint(images["key"]) == recorded:
        return None
    before, now = info.get("collection_images"), len(images)
    changes = [
        f"{before:,} images at the draw, {now:,} now"
        if isinstance(before, int) and before != now
        else f"{_count(now, 'image')} as at the draw, but not the same keys"
    ]
    gone = int((~held["key"].isin(images["key"])).sum())
    if gone:
        changes.append(f"{gone:,} of its {_count(len(held), 'image')} gone")
    keys = images["key"].isin(held["key"]).to_numpy(dtype=bool)
    later = int((kept_out(images, held, str(info.get("by"))) & ~keys).sum())
    if later:
        changes.append(
            f"{_count(later, 'image')} of its patients built since, left out of training "
            "and not in the set"
        )
    drawn_from = ", ".join(map(str, sources)) if isinstance(sources, list) else "its sources"
    if composition is not None:
        drawn_from += f" in composition {composition}"
    return (
        f"the images held-out set {name!r} of {out} was drawn from ({drawn_from}) changed "
        f"since the draw ({'; '.join(changes)}; its collection_sha256 differs); it is used as "
        f"drawn: run `machex holdout {out} --name {name} ... --overwrite` to draw it anew "
        "from the collection as it is (another set)"
    )


#: The columns of the images manifest that ``collection_change`` reads.
_CHANGE_COLUMNS = ["key", "source", "split", "patient_id"]


def _drawn_images(
    images: pd.DataFrame | None, images_sources: Collection[str] | None, sources: object
) -> pd.DataFrame | None:
    """``images`` (every image of ``images_sources``; None: of every source) cut to the
    sources a sidecar's ``sources`` select as ``load_manifest`` reads them (None: every
    source); None where ``images`` lacks some of them, or ``sources`` is no name or list of
    names (then the manifest is read, as ever)."""
    if images is None:
        return None
    if sources is None:
        return images[_CHANGE_COLUMNS] if images_sources is None else None
    if not isinstance(sources, str) and not (
        isinstance(sources, list) and all(isinstance(s, str) for s in sources)
    ):
        return None
    drawn = set(source_names(sources))
    if images_sources is not None and not drawn <= set(source_names(list(images_sources))):
        return None
    images = images[_CHANGE_COLUMNS]
    return images[images["source"].isin(drawn)]


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def make_holdout(
    out: Path,
    name: str,
    size: int,
    *,
    seed: int = DEFAULT_SEED,
    by: str | By = By.patient,
    sources: Sequence[str] | None = None,
    composition: str | None = None,
    overwrite: bool = False,
) -> HoldoutResult:
    """Draw ``size`` images (by patient: whole patients until at least ``size``) from the
    built collection ``out`` (or its ``sources``; with a ``composition``, only its (source,
    split) pairs: both given, the intersection) and write them as held-out set ``name``."""
    out = Path(out)
    check_name(name)
    try:
        by = By(by)
    except ValueError:
        raise HoldoutError(f"--by must be patient or image, not {by!r}") from None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise HoldoutError(f"--size must be a positive number of images, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HoldoutError(f"--seed must be a non-negative integer, got {seed!r}")
    images = _collection(out, sources, composition)
    if size > len(images):
        within = "" if composition is None else f" (composition {composition})"
        raise HoldoutError(
            f"--size {size:,} is more than the {len(images):,} images of "
            f"{', '.join(sorted(images['source'].unique()))}{within} in {out}"
        )

    units = _units(images)
    rng = np.random.default_rng(int(seed))
    if by is By.image:
        chosen = np.zeros(len(images), dtype=bool)
        chosen[rng.choice(len(images), size=int(size), replace=False)] = True
    else:
        counts = units.groupby(["source", "unit"], sort=True).size()  # patients, sorted
        order = rng.permutation(len(counts))
        cumulative = np.cumsum(counts.to_numpy()[order])
        taken = int(np.searchsorted(cumulative, size)) + 1  # the first patient reaching size
        picked = counts.index[order[:taken]]
        chosen = pd.MultiIndex.from_frame(units).isin(picked)
    held = images.loc[chosen, ["key", "source", "patient_id"]].reset_index(drop=True)
    result = HoldoutResult(
        name=name,
        size_requested=int(size),
        size=len(held),
        seed=int(seed),
        by=by.value,
        sources=sorted(images["source"].unique().tolist()),
        composition=composition,
        collection_images=len(images),
        collection_patients=int(units.drop_duplicates().shape[0]),
        collection_sha256=_fingerprint(images["key"]),
        leakage=leakage_report(images, chosen),
        path=holdout_paths(out, name)[0],
        frame=held,
    )
    _write(out, result, overwrite=overwrite)
    return result


def leakage_report(images: pd.DataFrame, held_out: np.ndarray) -> dict[str, object]:
    """How the held-out images' patients sit: ``patients_straddling`` held-out patients also
    have images outside the set (``images_outside`` of them, which training would see)."""
    units = _units(images)
    frame = units.assign(held=np.asarray(held_out, dtype=bool))
    per_patient = frame.groupby(["source", "unit"], sort=True)["held"].agg(["sum", "count"])
    per_patient = per_patient[per_patient["sum"] > 0]
    per_patient = per_patient.assign(outside=per_patient["count"] - per_patient["sum"])
    by_source = {}
    for source, group in per_patient.groupby(level="source", sort=True):
        by_source[str(source)] = {
            "images": int(group["sum"].sum()),
            "patients": len(group),
            "patients_straddling": int((group["outside"] > 0).sum()),
            "images_outside": int(group["outside"].sum()),
        }
    return {
        "images": int(per_patient["sum"].sum()),
        "patients": len(per_patient),
        "patients_straddling": int((per_patient["outside"] > 0).sum()),
        "images_outside": int(per_patient["outside"].sum()),
        "by_source": by_source,
    }


def _collection(
    out: Path, sources: Sequence[str] | None, composition: str | None = None
) -> pd.DataFrame:
    """The images drawn from (key, source, patient_id), sorted by key."""
    if not (out / "manifests").is_dir():
        raise HoldoutError(f"{out} holds no MaCheX build (no manifests/)")
    names = None if sources is None else sorted({_source_name(s) for s in sources})
    if names == []:
        raise HoldoutError("--source given with no source name")
    pairs = None
    if composition is not None:
        try:
            pairs = load_composition(composition)
        except TableError as error:
            raise HoldoutError(f"--composition: {error}") from None
        wanted = sorted({source for source, _ in pairs})
        outside = [n for n in names or () if n not in wanted]
        if outside:
            raise HoldoutError(
                f"--source {', '.join(outside)} is not in composition {composition!r}, which "
                f"holds {wanted}; leave --source out or name some of those"
            )
        selected = names if names is not None else wanted
    else:
        selected = names
    images = load_manifest(out, "images", selected)[["key", "source", "split", "patient_id"]]
    built = set(images["source"].unique())
    if names is not None and set(names) - built:
        have = sorted(load_manifest(out, "images")["source"].unique())
        raise HoldoutError(
            f"{out} holds no images of {', '.join(sorted(set(names) - built))}; it has {have}"
        )
    if pairs is not None:
        images = images[in_composition(images, pairs)]
        if images.empty:
            raise HoldoutError(
                f"{out} holds no images of composition {composition!r} "
                f"({', '.join(f'{s}/{p}' for s, p in pairs)})"
                + (f" among --source {', '.join(names)}" if names is not None else "")
            )
    images = images[["key", "source", "patient_id"]]
    if images.empty:
        raise HoldoutError(f"{out} holds no images")
    _refuse_unfinished(out, built)
    return images.sort_values(["key", "source"], kind="stable").reset_index(drop=True)


def unfinished_by_kind(out: Path, sources: Iterable[str]) -> tuple[list[str], list[str]]:
    """Those of ``sources`` whose build in ``out`` is not complete (``unfinished_sources``,
    in its order) as ``(running, unmerged)``: builds interrupted or still running, and
    sources built by ``--part`` runs not yet merged (``machex merge``). Raises
    ``BuildError`` for an unreadable build.json."""
    unfinished = unfinished_sources(out, sources)
    with_parts = set(sources_with_parts(out))
    running = [s for s in unfinished if s not in with_parts]
    unmerged = [s for s in unfinished if s in with_parts]
    return running, unmerged


def _refuse_unfinished(out: Path, sources: set[str]) -> None:
    """A source not completely built would change the draw once it is: refused, with the
    advice for a whole build and for ``--part`` runs not merged (``machex merge``)."""
    running, unmerged = unfinished_by_kind(out, sources)
    problems = []
    if running:
        problems.append(
            f"the build of {', '.join(running)} in {out} is not complete, so the draw would "
            "change when it is; finish the build first"
        )
    if unmerged:
        problems.append(
            f"the --part runs of {', '.join(unmerged)} in {out} are not merged, so the draw "
            "would change when they are; run every part, then `machex merge "
            f"{out}`"
        )
    if problems:
        raise HoldoutError("; ".join(problems) + ", or leave it out with --source")


def _source_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def holdout_fingerprint(out: Path, name: str) -> str:
    """SHA-256 of held-out set ``name``'s sorted keys: what a trained checkpoint records of
    the set it was trained without, so that an evaluation on a set redrawn since is told."""
    return _fingerprint(load_holdout(Path(out), name)["key"])


def _fingerprint(keys: pd.Series) -> str:
    """SHA-256 of the sorted keys, one per line: tells whether the collection changed."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def _units(images: pd.DataFrame) -> pd.DataFrame:
    """Each image's patient as (source, unit): the patient id, or the key where there is none."""
    unit = images["patient_id"].astype(object).where(images["patient_id"].notna(), images["key"])
    return pd.DataFrame({"source": images["source"].astype(str), "unit": unit.astype(str)})


def _write(out: Path, result: HoldoutResult, *, overwrite: bool) -> None:
    """The parquet file, then the JSON sidecar (its presence marks the set complete), each
    written to a temporary file and renamed, under a lock."""
    parquet, sidecar = holdout_paths(out, result.name)
    # from_pandas: a missing patient id is NaN in .tolist() (pandas 3), which Arrow refuses.
    frame = result.frame[list(SCHEMA.names)]
    arrow = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    document = result.to_dict() | {
        "path": str(parquet.relative_to(out)),
        "machex_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with _lock(out):
        if not overwrite and (parquet.exists() or sidecar.exists()):
            raise HoldoutError(
                f"{out} already has a holdout {result.name!r}; add --overwrite to replace it "
                "or choose another name"
            )
        parquet.parent.mkdir(parents=True, exist_ok=True)
        # The old sidecar goes first: cut off between the renames, an overwrite must leave an
        # unfinished set (refused), not new rows described by the old set's `by` and sources.
        sidecar.unlink(missing_ok=True)
        tmp = parquet.with_name(parquet.name + ".tmp")
        pq.write_table(arrow, tmp)
        os.replace(tmp, parquet)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, sidecar)


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    locks = out / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / "holdouts.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
