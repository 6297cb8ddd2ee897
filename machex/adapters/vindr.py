"""VinDr-CXR: 18,000 PA DICOMs (15,000 train read by 3 of 17 radiologists, 3,000 test read
by a consensus of 5), with every radiologist's boxes.

Two layouts (``../shared/datasets/SOURCES.md`` section 6), detected from what is under the
root:

- PhysioNet 1.0.0: ``train/`` and ``test/`` ``<image_id>.dicom``,
  ``annotations/annotations_{train,test}.csv`` (boxes: ``image_id, rad_id, class_name,
  x_min, y_min, x_max, y_max``) and ``annotations/image_labels_{train,test}.csv`` (one row
  per image and reader, a 0/1 column per label, 22 local + 6 global labels);
- Kaggle VinBigData: ``train/`` ``test/`` DICOMs and ``train.csv`` (``image_id,
  class_name, class_id, rad_id, x_min, y_min, x_max, y_max``; one row per box per reader, a
  reader who saw nothing gives one ``No finding`` row without coordinates; 14 local labels).

Labels are votes: ``reader_labels`` keeps every reader's positive calls, ``extras`` the
readers and the vote count per label, and the unified columns a consensus: a label is
positive when a majority of the image's readers marked it (2 of 3 for the training set; a
test image's single consensus row counts as is). VinDr publishes no patient ids: each
image stands for its own patient.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from machex.adapters.base import (
    DEFAULT_PLAN,
    MetadataError,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    find_metadata,
    finish_plan,
    index_files,
    make_key,
    read_metadata_csv,
)
from machex.records import FINDINGS, PATHOLOGIES, BoxRecord, ImageRecord, Label, ReaderLabel
from machex.tables import SourceTables

KAGGLE_TRAIN = "train.csv"
KAGGLE_COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
PHYSIONET_LABELS = "annotations/image_labels_{split}.csv"
PHYSIONET_BOXES = "annotations/annotations_{split}.csv"
BOX_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
SPLIT_FOLDERS = {"train": "train", "test": "test"}
DICOM_SUFFIXES = (".dicom", ".dcm")
NO_FINDING = "No finding"
#: PhysioNet's test labels spell one column differently from its training labels.
SPELLINGS = {"Other disease": "Other diseases"}
#: Reader of a row that carries no ``rad_id`` (PhysioNet test: the consensus of five).
CONSENSUS_READER = "consensus"
VIEW = "PA"
#: The 15 class names of the Kaggle release (the 14 local labels and No finding).
KAGGLE_CLASSES = frozenset(
    (
        "Aortic enlargement",
        "Atelectasis",
        "Calcification",
        "Cardiomegaly",
        "Consolidation",
        "ILD",
        "Infiltration",
        "Lung Opacity",
        "Nodule/Mass",
        "Other lesion",
        "Pleural effusion",
        "Pleural thickening",
        "Pneumothorax",
        "Pulmonary fibrosis",
        NO_FINDING,
    )
)


@dataclass
class ImageVotes:
    """Everything the metadata says about one image, gathered across rows."""

    readers: set[str] = field(default_factory=set)
    calls: set[tuple[str, str]] = field(default_factory=set)  # (reader, label)
    boxes: list[BoxRecord] = field(default_factory=list)


class VinDrAdapter(SourceAdapter):
    name = "vindr"
    aliases = ("vindr-cxr", "vinbigdata")
    title = "VinDr-CXR (VinBigData)"
    homepage = "https://physionet.org/content/vindr-cxr/1.0.0/"
    licence = (
        "PhysioNet Restricted Health Data License 1.0.0 (PhysioNet release); the Kaggle "
        "VinBigData copy is for the competition's non-commercial use"
    )
    citation = (
        "Nguyen H.Q. et al. VinDr-CXR: An open dataset of chest X-rays with radiologist's "
        "annotations. Scientific Data 9, 429 (2022)."
    )
    metadata_files = (f"{PHYSIONET_LABELS.format(split='train')}|{KAGGLE_TRAIN}",)
    metadata_columns = {KAGGLE_TRAIN: "class_name"}  # CheXpert also has a train.csv
    image_formats = ("dicom",)

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        physionet = find_metadata(root, PHYSIONET_LABELS.format(split="train")) is not None
        skipped: Counter[str] = Counter()
        warnings: list[str] = []
        votes: dict[str, dict[str, ImageVotes]] = {}
        if physionet:
            for split in SPLIT_FOLDERS:
                found = _physionet_votes(root, split, tables, skipped, warnings)
                if found is not None:
                    votes[split] = found
            classes: Iterable[str] = _physionet_classes(root)
        else:
            votes["train"] = _kaggle_votes(root, tables, skipped, warnings)
            classes = KAGGLE_CLASSES
        images = {
            split: index_files([root / folder], DICOM_SUFFIXES[0])
            | index_files([root / folder], DICOM_SUFFIXES[1])
            for split, folder in SPLIT_FOLDERS.items()
        }
        if "test" not in votes and images["test"]:
            # Kaggle: test images come without labels; they are still official test images.
            votes["test"] = {_stem(name): ImageVotes() for name in images["test"]}
        absent = _absent_values(tables, classes)
        records = [
            self._record(image_id, split, image_votes, images[split], tables, absent)
            for split, by_image in votes.items()
            for image_id, image_votes in by_image.items()
        ]
        take, reason = tables.view_decision(VIEW, options.views)  # every image is PA
        if not take:
            skipped[reason] += len(records)
            records = []
        listed = {image_id for by_image in votes.values() for image_id in by_image}
        unlisted = sum(_stem(n) not in listed for files in images.values() for n in files)
        if unlisted:
            warnings.append(f"{unlisted} DICOM files under train/ or test/ are in no metadata file")
        return finish_plan(self.name, root, records, skipped, tables, warnings)

    def _record(
        self,
        image_id: str,
        split: str,
        votes: ImageVotes,
        files: dict[str, str],
        tables: SourceTables,
        absent: dict[str, Label],
    ) -> ImageRecord:
        name = next((f"{image_id}{s}" for s in DICOM_SUFFIXES if f"{image_id}{s}" in files), None)
        counts = Counter(label for _, label in votes.calls)
        majority = len(votes.readers) / 2
        consensus = sorted(label for label, n in counts.items() if n > majority)
        labels = consensus_labels(consensus, counts, tables, absent if votes.readers else {})
        calls = sorted(votes.calls)
        return ImageRecord(
            key=make_key(self.name, image_id),
            source=self.name,
            source_key=f"{SPLIT_FOLDERS[split]}/{name or image_id + DICOM_SUFFIXES[0]}",
            path=files.get(name) if name else None,
            patient_id=image_id,
            study_id=None,
            view=VIEW,
            split=split,
            labels=labels,
            native_labels=tuple(consensus),
            boxes=tuple(votes.boxes),
            reader_labels=tuple(
                ReaderLabel(reader, label, _first(tables.label_map.get(label, ())))
                for reader, label in calls
            ),
            extras={"readers": sorted(votes.readers), "votes": dict(sorted(counts.items()))}
            if votes.readers
            else {},
        )


def _kaggle_votes(
    root: Path, tables: SourceTables, skipped: Counter[str], warnings: list[str]
) -> dict[str, ImageVotes]:
    """``train.csv`` rows -> votes: a reader's row of a class is that reader's call on it."""
    path = find_metadata(root, KAGGLE_TRAIN)
    assert path is not None  # locate_root checked it
    frame = read_metadata_csv(path, KAGGLE_COLUMNS)
    classes = [_spelling(c.strip()) for c in frame["class_name"]]
    votes: dict[str, ImageVotes] = defaultdict(ImageVotes)
    for image_id, reader, label in zip(frame["image_id"].str.strip(), frame["rad_id"], classes):
        if not image_id:
            skipped["row_without_image_id"] += 1
            continue
        reader = reader.strip() or CONSENSUS_READER
        votes[image_id].readers.add(reader)
        votes[image_id].calls.add((reader, label))
    _add_boxes(path, frame, tables, votes, skipped, warnings)
    return dict(votes)


def _physionet_votes(
    root: Path, split: str, tables: SourceTables, skipped: Counter[str], warnings: list[str]
) -> dict[str, ImageVotes] | None:
    """``image_labels_<split>.csv`` (0/1 per reader and label) and the split's boxes;
    ``None`` when the split has no label file (the training one is required)."""
    labels_path = find_metadata(root, PHYSIONET_LABELS.format(split=split))
    if labels_path is None:
        if split == "train":
            raise MetadataError(f"{root / PHYSIONET_LABELS.format(split=split)} is missing")
        return None
    frame = read_metadata_csv(labels_path, ("image_id",))
    frame = frame.rename(columns=SPELLINGS)
    label_columns = [c for c in frame.columns if c not in ("image_id", "rad_id")]
    _check_known(label_columns, tables, labels_path)
    ids = frame["image_id"].str.strip().tolist()
    readers = (
        [r.strip() or CONSENSUS_READER for r in frame["rad_id"]]
        if "rad_id" in frame.columns
        else [CONSENSUS_READER] * len(ids)
    )
    votes: dict[str, ImageVotes] = defaultdict(ImageVotes)
    for image_id, reader in zip(ids, readers):
        if image_id:
            votes[image_id].readers.add(reader)
        else:
            skipped["row_without_image_id"] += 1
    blanks: list[tuple[int, str]] = []  # (first row, column) per column with blank cells
    blank_cells = 0
    for column in label_columns:
        values = frame[column].str.strip()
        blank = values == ""
        bad = ~(blank | values.isin(["0", "1", "0.0", "1.0"]))
        if bad.any():
            raise MetadataError(
                f"{labels_path} row {int(bad.idxmax()) + 2}: column {column!r} is "
                f"{values[bad].iloc[0]!r}; expected 0 or 1"
            )
        if blank.any():
            blanks.append((int(blank.idxmax()) + 2, column))
            blank_cells += int(blank.sum())
        for index in values.isin(["1", "1.0"]).to_numpy().nonzero()[0].tolist():
            if ids[index]:
                votes[ids[index]].calls.add((readers[index], column))
    if blanks:
        row, column = min(blanks)
        warnings.append(
            f"{labels_path}: {blank_cells} blank label cells (first: row {row}, "
            f"column {column!r}) read as 0, the reader not marking that finding"
        )
    box_path = find_metadata(root, PHYSIONET_BOXES.format(split=split))
    if box_path is None:
        warnings.append(f"{root / PHYSIONET_BOXES.format(split=split)} not found: no {split} boxes")
    else:
        box_frame = read_metadata_csv(box_path, BOX_COLUMNS)
        _add_boxes(box_path, box_frame, tables, votes, skipped, warnings)
    return dict(votes)


def _add_boxes(
    path: Path,
    frame: pd.DataFrame,
    tables: SourceTables,
    votes: dict[str, ImageVotes],
    skipped: Counter[str],
    warnings: list[str],
) -> None:
    """Every reader's box, in original pixels (``xyxy`` -> ``xywh``). Rows without
    coordinates (``No finding``) carry no box; a malformed box is skipped, counted and
    reported by row, never guessed."""
    readers = frame["rad_id"] if "rad_id" in frame.columns else None
    coordinates = frame[["x_min", "y_min", "x_max", "y_max"]].apply(
        lambda c: pd.to_numeric(c.str.strip(), errors="coerce")
    )
    blank = (frame[["x_min", "y_min", "x_max", "y_max"]].apply(lambda c: c.str.strip()) == "").all(
        axis=1
    )
    _check_known({_spelling(c.strip()) for c in frame["class_name"]}, tables, path)
    bad_rows: list[int] = []
    rows = zip(
        frame.index.tolist(),
        frame["image_id"].str.strip(),
        frame["class_name"],
        readers if readers is not None else [""] * len(frame),
        coordinates.itertuples(index=False, name=None),
        blank.tolist(),
    )
    for index, image_id, class_name, reader, (x0, y0, x1, y1), is_blank in rows:
        if is_blank or not image_id:
            continue
        label = _spelling(class_name.strip())
        finite = all(not math.isnan(v) for v in (x0, y0, x1, y1))
        if not finite or x1 <= x0 or y1 <= y0 or min(x0, y0) < 0 or label == NO_FINDING:
            bad_rows.append(index + 2)
            continue
        if image_id not in votes:  # PhysioNet: a box of an image the label file lacks
            skipped["box_of_unlabelled_image"] += 1
            continue
        votes[image_id].boxes.append(
            BoxRecord(
                label=label,
                x=float(x0),
                y=float(y0),
                width=float(x1 - x0),
                height=float(y1 - y0),
                reader=reader.strip() or CONSENSUS_READER,
                finding=_first(tables.label_map.get(label, ())),
            )
        )
    if bad_rows:
        skipped["malformed_box_row"] += len(bad_rows)
        warnings.append(
            f"{path}: {len(bad_rows)} box rows with missing, non-numeric, negative or "
            f"inverted coordinates were skipped (first: row {bad_rows[0]})"
        )


def _physionet_classes(root: Path) -> set[str]:
    """The labels the PhysioNet release annotates: the training label columns."""
    path = find_metadata(root, PHYSIONET_LABELS.format(split="train"))
    assert path is not None
    columns = pd.read_csv(path, nrows=0).columns
    return {SPELLINGS.get(c, c) for c in columns if c not in ("image_id", "rad_id")}


def _absent_values(tables: SourceTables, classes: Iterable[str]) -> dict[str, Label]:
    """What a finding is when no majority marked it: ``absent.csv``'s value where the
    layout annotates a label feeding it (Edema exists only in the PhysioNet release),
    blank otherwise."""
    annotated = {f for c in classes for f in tables.label_map.get(c, ())}
    return {f: tables.absent.get(f) if f in annotated else None for f in FINDINGS}


def _check_known(labels: Iterable[str], tables: SourceTables, path: Path) -> None:
    unknown = sorted(set(labels) - set(tables.label_map))
    if unknown:
        raise MetadataError(
            f"{path}: unknown labels {unknown}; manifests/vindr/labels.csv knows "
            f"{sorted(tables.label_map)}"
        )


def _spelling(label: str) -> str:
    return SPELLINGS.get(label, label)


def consensus_labels(
    consensus: list[str], counts: Counter[str], tables: SourceTables, absent: dict[str, Label]
) -> dict[str, Label]:
    """The unified labels of one image from its readers' calls.

    A finding fed by a consensus label is 1. One fed only by labels a minority marked is -1
    (the readers disagree: not a negative; with 3 readers, one of them marked it), except
    No Finding when a pathology is 1 (then 0). Every other finding takes ``absent`` (the
    layout's ``absent.csv`` values; ``{}``: an image nobody read, every finding null)."""
    labels: dict[str, Label] = {f: absent.get(f) for f in FINDINGS}
    chosen = set(consensus)
    for label in sorted(counts):
        for finding in tables.label_map.get(label, ()):
            if label in chosen:
                labels[finding] = 1
            elif labels[finding] != 1:
                labels[finding] = -1
    if labels["No Finding"] == -1 and any(labels[f] == 1 for f in PATHOLOGIES):
        labels["No Finding"] = 0
    return labels


def _first(findings: Iterable[str]) -> str | None:
    return next(iter(findings), None)


def _stem(name: str) -> str:
    for suffix in DICOM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
