"""Miniature BRAX (PhysioNet v1.1.0) in its real layout: 16-bit PNGs and their DICOM twins.

The metadata is credentialed, so the CSV is written from the documented format
(``../shared/datasets/SOURCES.md`` section 5), not copied from the real file. Twelve rows over
five patients cover the quirks the adapter handles: PA, AP, lateral (``L``), decubitus
(``AP LLD``) and blank views; label cells ``1.0``/``0.0``/``-1.0``/blank and, for one patient,
the integer spellings; ``M``/``F``/``O`` and the ``85 or more`` age bin; one ``PngPath`` and one
``DicomPath`` with 7 junk characters appended (the original code's ``path_offset = 7``); and one
image stored outside its ``Series_`` folder, so it is found only by its ``image-<UID>`` name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from machex.sample.common import synthetic_radiograph, write_text

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "brax"

BRAX_FOLDER = ("brax", "1.1.0")
BRAX_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
BRAX_HEADER = ",".join(
    (
        "DicomPath",
        "PngPath",
        "PatientID",
        "PatientSex",
        "PatientAge",
        "AccessionNumber",
        "StudyDate",
        "ViewPosition",
        *BRAX_FINDINGS,
        "Rows",
        "Columns",
        "Manufacturer",
    )
)
#: Appended to one PngPath and one DicomPath: the original code cut 7 characters off the end.
JUNK = "_x7junk"
#: Per patient: (sex, age bin, studies), each study a list of ViewPosition values, one per image.
PATIENTS: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
    ("M", "55", (("PA", "L"),)),
    ("F", "70", (("AP",), ("PA", "L"))),
    ("O", "", (("", "AP"),)),
    ("F", "85 or more", (("PA", "AP LLD"),)),
    ("M", "0", (("AP", "L"), ("PA",))),
)
#: (patient, study, image) positions of the path quirks; all are AP/PA images (kept).
PNG_JUNK = (1, 0, 0)
DICOM_JUNK = (4, 1, 0)
BY_NAME_ONLY = (2, 0, 1)
INTEGER_LABELS = 4  # this patient's label cells are written 1/0/-1 instead of 1.0/0.0/-1.0

_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _labels(rng: np.random.Generator, *, integers: bool, uncertain: bool) -> list[str]:
    """The 14 label cells of one image, in BRAX's column order (No Finding first);
    ``uncertain`` makes Edema ``-1.0`` whatever the draw."""
    choices = ("", "", "", "0.0", "1.0", "-1.0")
    cells = [choices[int(rng.integers(len(choices)))] for _ in BRAX_FINDINGS[1:]]
    if uncertain:
        cells[BRAX_FINDINGS.index("Edema") - 1] = "-1.0"
    positive = any(cell in ("1.0", "-1.0") for cell in cells[:-1])
    cells = ["" if positive else "1.0", *cells]
    if integers:
        cells = [cell.removesuffix(".0") for cell in cells]
    return cells


def _save_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit grayscale PNG (fixed options, no timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = pixels.shape
    image = Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    image.save(path, format="PNG", compress_level=1)


def _save_dicom(path: Path, pixels: np.ndarray, uids: tuple[str, str, str], tags: dict) -> None:
    """An uncompressed MONOCHROME2 DX file, 16 bits allocated and 12 stored; no dates, the
    implementation UID and name fixed so the bytes do not depend on the pydicom version."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop, study, series = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["machex sample writer"])
    meta.ImplementationVersionName = "MACHEX_SAMPLE"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "DX"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_brax(root: Path, rng: np.random.Generator) -> Path:
    """Write a miniature BRAX under ``root/brax/1.1.0`` and return that folder."""
    from pydicom.uid import generate_uid

    ds = Path(root).joinpath(*BRAX_FOLDER)
    token = f"{int(rng.integers(2**62)):x}"  # every UID depends on the random stream

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[token, *map(str, parts)])

    lines = [BRAX_HEADER]
    for p, (sex, age, studies) in enumerate(PATIENTS):
        patient = f"{int(rng.integers(10**7, 10**8))}"
        for s, views in enumerate(studies):
            study, series = uid("study", p, s), uid("series", p, s)
            accession = f"{int(rng.integers(10**9, 10**10))}"
            date = f"2{int(rng.integers(100, 200))}-0{1 + s}-1{p}"  # fictitious, as released
            folder = f"id_{patient}/Study_{study}/Series_{series}"
            for i, view in enumerate(views):
                name = f"image-{uid('image', p, s, i)}"
                png, dicom = f"images/{folder}/{name}.png", f"Anonymized_DICOMs/{folder}/{name}.dcm"
                width = 300 + int(rng.integers(-8, 9))
                height = 360 + int(rng.integers(-8, 9))
                pixels = synthetic_radiograph(rng, width, height, bits=12)
                png_file, dicom_file = ds / png, ds / dicom
                if (p, s, i) == BY_NAME_ONLY:  # unpacked without its Series_ folder
                    moved = f"id_{patient}/Study_{study}/{name}"
                    png_file = ds / f"images/{moved}.png"
                    dicom_file = ds / f"Anonymized_DICOMs/{moved}.dcm"
                _save_png16(png_file, pixels)
                tags = {"PatientID": patient, "PatientSex": sex, "ViewPosition": view}
                _save_dicom(dicom_file, pixels, (uid("image", p, s, i), study, series), tags)
                labels = _labels(rng, integers=p == INTEGER_LABELS, uncertain=s == i == 0)
                cells = [
                    dicom + (JUNK if (p, s, i) == DICOM_JUNK else ""),
                    png + (JUNK if (p, s, i) == PNG_JUNK else ""),
                    patient,
                    sex,
                    age,
                    accession,
                    date,
                    view,
                    *labels,
                    str(height),
                    str(width),
                    str(int(rng.integers(0, 4))),
                ]
                lines.append(",".join(cells))
    write_text(ds / "master_spreadsheet_update.csv", lines)
    return ds


def make(dest: Path, rng: np.random.Generator) -> Path:
    return make_brax(dest, rng)
