"""Miniature ChestX-ray14 (NIH) in its real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from machex.sample.common import save_image, synthetic_radiograph, write_text

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "chestxray14"

NIH_FOLDER = "ChestX-ray14"
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # sic: 9 fields, rows have 6
_NIH_LABEL_TEXT = (  # the 14 findings, pipe-joined as in the Finding Labels column
    "Atelectasis|Cardiomegaly|Effusion|Infiltration|Mass|Nodule|Pneumonia|Pneumothorax|"
    "Consolidation|Edema|Emphysema|Fibrosis|Pleural_Thickening|Hernia"
)
NIH_FINDINGS = tuple(_NIH_LABEL_TEXT.split("|"))
# Data_Entry spelling -> BBox_List spelling, for the 8 classes that have boxes.
NIH_BOX_LABELS = {name: name for name in NIH_FINDINGS[:8]} | {"Infiltration": "Infiltrate"}
# Frequent (width, height, pixel spacing) cells of Data_Entry_2017_v2020.csv, as written there.
NIH_ORIGINALS = (
    ("2500", "2048", "0.168"),
    ("2992", "2991", "0.14300000000000002"),
    ("3056", "2544", "0.139"),
    ("2500", "2048", "0.171"),
    ("2048", "2500", "0.168"),
    ("2021", "2021", "0.19431099999999998"),
)


def make_nih(
    root: Path, rng: np.random.Generator, *, n_patients: int = 10, kaggle_layout: bool
) -> Path:
    """Write a miniature ChestX-ray14 under ``root/ChestX-ray14`` and return that folder.

    ``kaggle_layout`` splits the PNGs over ``images_001/images`` and ``images_002/images``
    (Kaggle mirror) instead of one flat ``images/`` (NIH Box release).
    """
    if n_patients < 2:
        raise ValueError("n_patients must be at least 2 (train_val and test are patient-disjoint)")
    ds = Path(root) / NIH_FOLDER
    pids = np.sort(rng.choice(np.arange(1, 30806), size=n_patients, replace=False))
    rows: list[list] = []  # [name, labels, follow-up, pid, age, sex, view, w, h, sx, sy]
    for pid in pids.tolist():
        sex, age = ("M" if rng.random() < 0.56 else "F"), int(rng.integers(1, 93))
        for fu in range(int(rng.choice(4, p=(0.35, 0.3, 0.2, 0.15))) + 1):
            age = min(95, age + int(rng.integers(0, 2)))
            k = 0 if rng.random() < 0.45 else int(rng.integers(1, 4))
            labels = sorted(NIH_FINDINGS[i] for i in rng.choice(14, size=k, replace=False))
            view = "PA" if rng.random() < 0.6 else "AP"
            w, h, sp = NIH_ORIGINALS[int(rng.integers(len(NIH_ORIGINALS)))]
            rows.append([f"{pid:08d}_{fu:03d}.png", labels, fu, pid, age, sex, view, w, h, sp, sp])

    # Boxes: two on the first chosen image, one on each of the others, always for a finding
    # that the image's Finding Labels contain (added to the labels where missing).
    boxable = tuple(NIH_BOX_LABELS)
    boxes: list[tuple[str, str, float, float, float, float]] = []
    for n, i in enumerate(sorted(rng.choice(len(rows), size=min(4, len(rows)), replace=False))):
        have = [label for label in rows[i][1] if label in NIH_BOX_LABELS]
        while len(have) < (2 if n == 0 else 1):
            extra = boxable[int(rng.integers(len(boxable)))]
            have += [] if extra in have else [extra]
        rows[i][1] = sorted(set(rows[i][1]) | set(have))
        for label in have[: 2 if n == 0 else 1]:
            bw, bh = rng.uniform(40.0, 320.0, size=2)
            bx, by = rng.uniform(16.0, 1008.0 - bw), rng.uniform(16.0, 1008.0 - bh)
            boxes.append((NIH_BOX_LABELS[label], rows[i][0], bx, by, bw, bh))
    boxes.sort()

    entries = []
    for row in rows:
        row[1] = "|".join(row[1]) or "No Finding"
        entries.append(",".join(str(cell) for cell in row))
    write_text(ds / "Data_Entry_2017_v2020.csv", [NIH_HEADER, *entries])
    write_text(
        ds / "BBox_List_2017.csv",
        [NIH_BBOX_HEADER]
        + [",".join([name, label] + [f"{v:.15g}" for v in xywh]) for label, name, *xywh in boxes],
    )
    perm = rng.permutation(pids)
    train_pids = set(perm[: min(n_patients - 1, max(1, round(0.75 * n_patients)))].tolist())
    write_text(ds / "train_val_list.txt", [r[0] for r in rows if r[3] in train_pids])
    write_text(ds / "test_list.txt", [r[0] for r in rows if r[3] not in train_pids])

    half = (len(rows) + 1) // 2
    for n, row in enumerate(rows):
        folder = (f"images_{1 + n // half:03d}/images") if kaggle_layout else "images"
        save_image(ds / folder / row[0], synthetic_radiograph(rng, 1024, 1024))
    return ds


def make(dest: Path, rng: np.random.Generator) -> Path:
    """The demo's ChestX-ray14: the Kaggle mirror's layout."""
    return make_nih(dest, rng, kaggle_layout=True)
