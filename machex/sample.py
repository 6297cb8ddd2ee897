"""Miniature copies of public chest X-ray datasets, in their real on-disk layout.

The MaCheX build reads every source exactly as its publisher ships it, but the real
releases are hundreds of gigabytes behind registration walls. This module writes a tiny
stand-in for each source with the same folder structure, file names, CSV headers and
cell formats as the official release (copied from the real metadata files), filled with
small synthetic radiographs, so the build tool can be demonstrated and tested offline.
The images are fake: never train or evaluate on them.

All randomness comes from an explicit ``numpy.random.Generator``; the same seed gives
byte-identical files (PNG and JPEG are written with fixed options and no timestamps).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_SOURCES: tuple[str, ...] = ("chestxray14", "chexpert")

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
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
CHEXPERT_FINDINGS = tuple(CHEXPERT_HEADER.split(",")[5:])


def synthetic_radiograph(
    rng: np.random.Generator, width: int, height: int, *, bits: int = 8
) -> np.ndarray:
    """A chest-radiograph-like grayscale image: uint8 (bits=8) or uint16 with values < 2**bits.

    Dark background, a soft-tissue thorax, two darker elliptical lung fields, a bright
    mediastinum/spine band and heart shadow, smooth gradients and mild noise. ``bits`` <= 8
    gives uint8, 9..16 gives uint16.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    f32 = np.float32
    y = np.linspace(-1.0, 1.0, height, dtype=f32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=f32)[None, :]
    j = rng.uniform(-1.0, 1.0, size=8).astype(f32)  # per-image jitter of the anatomy

    def blob(cx: float, cy: float, rx: float, ry: float, edge: float) -> np.ndarray:
        """1 inside an ellipse, falling smoothly to 0 across a band of relative width edge."""
        r2 = ((x - f32(cx)) / f32(rx)) ** 2 + ((y - f32(cy)) / f32(ry)) ** 2
        return np.clip((f32(1.0) - r2) * f32(1.0 / edge), 0.0, 1.0)

    img = blob(0.03 * j[0], 0.4, 0.98 + 0.04 * j[1], 1.35, 0.3) * f32(0.45)  # thorax
    lung_w, lung_h, lung_y = 0.27 + 0.02 * j[2], 0.58 + 0.05 * j[3], -0.1 + 0.04 * j[4]
    img -= blob(-0.36, lung_y, lung_w, lung_h, 0.5) * f32(0.2)
    img -= blob(0.36 + 0.02 * j[5], lung_y + 0.03, lung_w * 0.95, lung_h * 0.95, 0.5) * f32(0.2)
    spine = np.exp(-(((x - f32(0.02 * j[6])) / f32(0.1)) ** 2))  # mediastinum/spine band
    img += spine * np.clip(y + f32(0.85), 0.0, 0.35) * f32(0.95)
    img += blob(0.12 + 0.03 * j[7], 0.3, 0.32, 0.25, 2.0) * f32(0.22)  # heart shadow
    img += f32(0.05) + f32(0.06) * y  # baseline, brighter towards the abdomen
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    noise = rng.standard_normal(half_h * half_w, dtype=f32).reshape(half_h, half_w)
    img += (noise * f32(0.006)).repeat(2, axis=0)[:height].repeat(2, axis=1)[:, :width]
    top = float(2**bits - 1)
    out = np.clip(img, 0.0, 1.0) * f32(top) + f32(0.5)
    return out.astype(np.uint8 if bits <= 8 else np.uint16)


def _write_text(path: Path, lines: Sequence[str]) -> None:
    """Write lines with '\\n' endings (as the real files have), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")


def _save_image(path: Path, pixels: np.ndarray) -> None:
    """Save a uint8 array (HxW or HxWx3) as PNG or JPEG with fixed, timestamp-free options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="JPEG", quality=90)


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
    _write_text(ds / "Data_Entry_2017_v2020.csv", [NIH_HEADER, *entries])
    _write_text(
        ds / "BBox_List_2017.csv",
        [NIH_BBOX_HEADER]
        + [",".join([name, label] + [f"{v:.15g}" for v in xywh]) for label, name, *xywh in boxes],
    )
    perm = rng.permutation(pids)
    train_pids = set(perm[: min(n_patients - 1, max(1, round(0.75 * n_patients)))].tolist())
    _write_text(ds / "train_val_list.txt", [r[0] for r in rows if r[3] in train_pids])
    _write_text(ds / "test_list.txt", [r[0] for r in rows if r[3] not in train_pids])

    half = (len(rows) + 1) // 2
    for n, row in enumerate(rows):
        folder = (f"images_{1 + n // half:03d}/images") if kaggle_layout else "images"
        _save_image(ds / folder / row[0], synthetic_radiograph(rng, 1024, 1024))
    return ds


def _chexpert_labels(rng: np.random.Generator, valid: bool) -> list[str]:
    """The 14 label cells of one study, in CSV order (No Finding first)."""
    if valid:  # radiologist consensus: every cell 0.0 or 1.0
        findings = ["1.0" if rng.random() < 0.2 else "0.0" for _ in CHEXPERT_FINDINGS[1:]]
        return ["0.0" if "1.0" in findings[:-1] else "1.0", *findings]
    normal = rng.random() < 0.3
    choices = ("", "", "", "", "0.0") if normal else ("", "", "", "", "1.0", "0.0", "-1.0")
    findings = [choices[int(rng.integers(len(choices)))] for _ in CHEXPERT_FINDINGS[1:-1]]
    findings.append(("", "1.0", "0.0")[int(rng.integers(3))])  # Support Devices
    positive = any(cell in ("1.0", "-1.0") for cell in findings[:-1])
    return ["" if positive else "1.0", *findings]


def make_chexpert(root: Path, rng: np.random.Generator, *, small: bool = True) -> Path:
    """Write a miniature CheXpert under ``root/CheXpert-v1.0-small`` (or ``CheXpert-v1.0``
    when ``small`` is False) and return that folder."""
    top = "CheXpert-v1.0-small" if small else "CheXpert-v1.0"
    ds = Path(root) / top
    (w0, h0), dw = ((320, 390), 10) if small else ((2000, 2400), 80)
    csvs: dict[str, list[str]] = {"train": [], "valid": []}
    patients = [("train", p) for p in range(1, 9)] + [("valid", p) for p in (64541, 64542)]
    for split, p in patients:
        sex = "Unknown" if p == 5 else ("Male" if rng.random() < 0.6 else "Female")
        age = int(rng.integers(18, 90))
        for study in range(1, 2 if split == "valid" else 2 + int(rng.integers(2))):
            if study > 1:
                age = min(90, age + int(rng.integers(0, 3)))
            labels = _chexpert_labels(rng, split == "valid")
            views = [("Frontal", "AP" if rng.random() < 0.75 else "PA")]
            if p == 3 and study == 1:  # the real train.csv has a few Frontal + LL rows
                views.append(("Frontal", "LL"))
            if split == "valid" or p == 1 or rng.random() < 0.6:
                views.append(("Lateral", ""))
            for v, (kind, appa) in enumerate(views, start=1):
                rel = f"{split}/patient{p:05d}/study{study}/view{v}_{kind.lower()}.jpg"
                csvs[split].append(",".join([f"{top}/{rel}", sex, str(age), kind, appa, *labels]))
                width = w0 + int(rng.integers(-dw, dw + 1))
                height = h0 + int(rng.integers(-dw, dw + 1))
                pixels = synthetic_radiograph(rng, width, height)
                if p == 2 and study == 1 and v == 1:  # one odd 3-channel JPEG, as in the wild
                    pixels = np.repeat(pixels[:, :, None], 3, axis=2)
                _save_image(ds / rel, pixels)
    for split, lines in csvs.items():
        _write_text(ds / f"{split}.csv", [CHEXPERT_HEADER, *lines])
    return ds


def make_sample(
    dest: Path, sources: Sequence[str] = SAMPLE_SOURCES, *, seed: int = 0
) -> dict[str, Path]:
    """Write a miniature copy of each source under dest/<folder>; return {source: dataset root}.

    Each source gets its own random stream derived from ``seed``, so its files do not depend
    on which other sources are generated alongside it.
    """
    if isinstance(sources, str):
        sources = (sources,)
    unknown = [name for name in sources if name not in SAMPLE_SOURCES]
    if unknown:
        raise ValueError(
            f"unknown sample source(s) {unknown}; valid choices: {', '.join(SAMPLE_SOURCES)}"
        )
    dest = Path(dest)
    roots: dict[str, Path] = {}
    for name in sources:
        rng = np.random.default_rng([seed, SAMPLE_SOURCES.index(name)])
        if name == "chestxray14":
            roots[name] = make_nih(dest, rng, kaggle_layout=True)
        else:
            roots[name] = make_chexpert(dest, rng, small=True)
    return roots
