"""Miniature CheXpert (the -small release by default) in its real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from machex.sample.common import save_image, synthetic_radiograph, write_text

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "chexpert"

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
CHEXPERT_FINDINGS = tuple(CHEXPERT_HEADER.split(",")[5:])


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
                save_image(ds / rel, pixels)
    for split, lines in csvs.items():
        write_text(ds / f"{split}.csv", [CHEXPERT_HEADER, *lines])
    return ds


def make(dest: Path, rng: np.random.Generator) -> Path:
    """The demo's CheXpert: the -small release."""
    return make_chexpert(dest, rng, small=True)
