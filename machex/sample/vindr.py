"""Miniature VinDr-CXR, in the Kaggle VinBigData layout (default) or the PhysioNet one.

Portrait DICOMs (the centre crop cuts their top and bottom), 12-bit values in 16-bit
words, some MONOCHROME1 and one with a misstated ``BitsStored``, as the real files have;
three readers per training image, each either marking boxes or saying ``No finding``. One
box lies entirely in the strip the crop removes, one straddles its edge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from machex.sample.common import synthetic_radiograph, write_text
from machex.sample.dicom import write_dicom

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "vindr"

KAGGLE_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
#: Kaggle class ids (train.csv's class_id column).
KAGGLE_IDS = {
    "Aortic enlargement": 0,
    "Atelectasis": 1,
    "Calcification": 2,
    "Cardiomegaly": 3,
    "Consolidation": 4,
    "ILD": 5,
    "Infiltration": 6,
    "Lung Opacity": 7,
    "Nodule/Mass": 8,
    "Other lesion": 9,
    "Pleural effusion": 10,
    "Pleural thickening": 11,
    "Pneumothorax": 12,
    "Pulmonary fibrosis": 13,
    "No finding": 14,
}
#: PhysioNet image_labels_train.csv columns after ``image_id, rad_id`` (22 local, 6 global).
PHYSIONET_LABELS = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
)
WIDTH, HEIGHT = 320, 400


def make_vindr(
    dest: Path, rng: np.random.Generator, *, layout: str = "kaggle", n_train: int = 8
) -> Path:
    """Write the miniature under ``dest/vinbigdata`` (Kaggle) or ``dest/vindr-cxr/1.0.0``
    (PhysioNet) and return that root."""
    if layout not in ("kaggle", "physionet"):
        raise ValueError(f"layout must be kaggle or physionet, not {layout!r}")
    root = dest / ("vinbigdata" if layout == "kaggle" else "vindr-cxr/1.0.0")
    train_ids = [_image_id(rng) for _ in range(n_train)]
    test_ids = [_image_id(rng) for _ in range(2)]
    for index, image_id in enumerate(train_ids + test_ids):
        folder = "train" if index < n_train else "test"
        _write_image(root / folder / f"{image_id}.dicom", rng, index)

    readers = [f"R{i}" for i in range(1, 18)]
    box_rows: list[tuple[str, str, str, tuple[float, ...] | None]] = []  # id, reader, label, box
    for index, image_id in enumerate(train_ids):
        chosen = rng.choice(readers, size=3, replace=False)
        findings = ["Cardiomegaly", "Pleural effusion", "Nodule/Mass", "Aortic enlargement"]
        shared = findings[index % len(findings)]
        for reader in chosen:
            if index % 3 == 0 and reader == chosen[0]:
                box_rows.append((image_id, str(reader), "No finding", None))
                continue
            box_rows.append((image_id, str(reader), shared, _box(rng)))
            if index == 1 and reader == chosen[1]:  # in the top strip the crop removes
                box_rows.append((image_id, str(reader), "Other lesion", (30.0, 10.0, 90.0, 30.0)))
            if index == 2 and reader == chosen[1]:  # straddles the crop's bottom edge
                box_rows.append(
                    (image_id, str(reader), "Nodule/Mass", (100.0, 340.0, 160.0, 390.0))
                )
    if layout == "kaggle":
        _write_kaggle(root, box_rows)
    else:
        _write_physionet(root, box_rows, test_ids)
    return root


def _image_id(rng: np.random.Generator) -> str:
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, size=16, dtype=np.uint8))


def _write_image(path: Path, rng: np.random.Generator, index: int) -> None:
    pixels = synthetic_radiograph(rng, WIDTH, HEIGHT, bits=12).astype(np.uint16)
    photometric = "MONOCHROME1" if index % 4 == 1 else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)
    write_dicom(
        path,
        pixels,
        photometric=photometric,
        bits_stored=8 if index == 3 else 12,  # a misstated BitsStored, as some real files
        sex=("M", "F", None)[index % 3],
        age=f"{40 + index:03d}Y" if index % 2 == 0 else None,
    )


def _box(rng: np.random.Generator) -> tuple[float, ...]:
    x0, y0 = float(rng.integers(20, 150)), float(rng.integers(80, 200))
    return x0, y0, x0 + float(rng.integers(30, 120)), y0 + float(rng.integers(30, 100))


def _coordinates(box: tuple[float, ...] | None) -> str:
    return ",,," if box is None else ",".join(f"{v:.1f}" for v in box)


def _write_kaggle(root: Path, rows: list[tuple[str, str, str, tuple[float, ...] | None]]) -> None:
    lines = [
        f"{image_id},{label},{KAGGLE_IDS[label]},{reader},{_coordinates(box)}"
        for image_id, reader, label, box in rows
    ]
    write_text(root / "train.csv", [KAGGLE_HEADER, *lines])


def _write_physionet(
    root: Path, rows: list[tuple[str, str, str, tuple[float, ...] | None]], test_ids: list[str]
) -> None:
    boxes = [
        f"{image_id},{reader},{label},{_coordinates(box)}"
        for image_id, reader, label, box in rows
        if box is not None
    ]
    header = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max"
    write_text(root / "annotations" / "annotations_train.csv", [header, *boxes])
    write_text(root / "annotations" / "annotations_test.csv", [header])
    calls: dict[tuple[str, str], set[str]] = {}
    for image_id, reader, label, _ in rows:
        calls.setdefault((image_id, reader), set()).add(label)
    lines = [
        ",".join([image_id, reader, *("1" if n in labels else "0" for n in PHYSIONET_LABELS)])
        for (image_id, reader), labels in calls.items()
    ]
    header = ",".join(["image_id", "rad_id", *PHYSIONET_LABELS])
    write_text(root / "annotations" / "image_labels_train.csv", [header, *lines])
    # The test labels are one consensus row per image, and spell one column differently.
    test_header = ",".join(["image_id", *PHYSIONET_LABELS]).replace(
        "Other diseases", "Other disease"
    )
    no_finding = ["0"] * (len(PHYSIONET_LABELS) - 1) + ["1"]
    test_lines = [",".join([image_id, *no_finding]) for image_id in test_ids]
    write_text(root / "annotations" / "image_labels_test.csv", [test_header, *test_lines])


def make(dest: Path, rng: np.random.Generator) -> Path:
    return make_vindr(dest, rng)
