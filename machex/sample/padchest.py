"""Miniature PadChest (BIMCV) in its real layout: ``<ImageDir>/<ImageID>`` 16-bit PNGs beside
``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``.

The CSV has the real file's 36 columns in their order (the first with an empty header) and
its cell formats: long digit ids, ``ImageID`` = ``<StudyID>_<suffix>.png`` in both of the
release's spellings, birth years as float text, literal ``nan`` / ``None`` placeholders, list
literals with leading-space names and ``''``, numpy-style CUI lists without commas. Report,
label and DICOM cells are copied from frequent rows of the real file (no identifier is); ids,
dates and ages are drawn from the random stream. Twelve images of eight patients cover the
projections ``PA``, ``AP``, ``AP_horizontal``, ``L`` and ``COSTAL``; ``normal`` beside a
finding; an unlabelled (``nan``) and an empty (``['']``) label list; a ``nan`` report, sex and
window; a blank birth year; a pediatric, a CNN-classified and a 10-bit image; and one
``ImageID`` spelled with spaces (as the original MaCheX code spelled three names), so file
names with spaces are exercised.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from machex.sample.common import synthetic_radiograph, write_text

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "padchest"

PADCHEST_FOLDER = "PadChest"
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_HEADER = (
    "",
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM",
    "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM",
    "BitsStored_DICOM",
    "WindowCenter_DICOM",
    "WindowWidth_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
    "XRayTubeCurrent_DICOM",
    "Exposure_DICOM",
    "ExposureInuAs_DICOM",
    "ExposureTime",
    "RelativeXRayExposure_DICOM",
    "ReportID",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
)

#: ``Modality_DICOM`` .. ``BitsStored_DICOM`` of the three acquisition profiles of the real
#: file (window, size and exposure cells are written per image, in each profile's format).
_IDC = ("CR", "ImagingDynamicsCompanyLtd", "MONOCHROME2", "0", "None", "None", "12")
_PHILIPS = ("CR", "PhilipsMedicalSystems", "MONOCHROME2", "0", "['1', '1']", "0.2", "12")
_PHILIPS10 = ("CR", "PhilipsMedicalSystems", "MONOCHROME2", "0", "None", "None", "10")

#: Report, MethodLabel, Labels, Localizations, LabelsLocalizationsBySentence, labelCUIS,
#: LocalizationsCUIS: cells of frequent rows of the real CSV.
_NORMAL = (
    " sin hallazg patolog edad pacient .",
    "Physician",
    "['normal']",
    "[]",
    "[['normal'], ['normal']]",
    "[]",
    "[]",
)
_CARDIO = (
    " gran cardiomegali global . elongacion aortic tronc supraaort . no identif sign edem "
    "agud pulmon estudi .",
    "RNN_model",
    "['cardiomegaly', 'aortic elongation', ' supra aortic elongation']",
    "['loc supra aortic', 'loc aortic', 'loc cardiac']",
    "['cardiomegaly', 'loc cardiac', 'aortic elongation', ' supra aortic elongation', "
    "'loc supra aortic', 'loc aortic', 'normal']",
    "['C0018800']",
    "['C0003483' 'C1522601']",
)
_TUBE_NORMAL = (
    " radiografi torax anter posterior sond nasogastr infradiafragmat . condens alveolar "
    "bilateral .",
    "RNN_model",
    "['NSG tube', ' normal', 'alveolar pattern']",
    "['loc bilateral', 'loc infradiaphragm']",
    "['NSG tube', ' normal', 'loc infradiaphragm', 'alveolar pattern', 'loc bilateral']",
    "['C1332240']",
    "['C0238767']",
)
_LINES = (
    " sond nasogastr cam gastric . catet central via yugul con punt ven cav superior .",
    "Physician",
    "['NSG tube', 'central venous catheter via jugular vein']",
    "['loc gastric chamber', 'loc superior cave vein', 'loc central']",
    "[['NSG tube', 'loc gastric chamber'], ['central venous catheter via jugular vein', "
    "'loc superior cave vein', 'loc central']]",
    "['C0398278']",
    "['C3714551' 'C3165182' 'C0205099']",
)
_UNLABELLED = ("nan", "RNN_model", "nan", "nan", "nan", "", "")
_PNEUMONIA = (
    " neumoni subsegmentari camp medi pulmon izquierd .",
    "Physician",
    "['pneumonia']",
    "['loc subsegmental', 'loc lung field', 'loc middle lung field', 'loc left']",
    "[['pneumonia', 'loc subsegmental', 'loc lung field', 'loc middle lung field', 'loc left']]",
    "['C0032285']",
    "['C0929165' 'C0225759' 'C0929434' 'C0443246']",
)
_COPD = (
    " sign epoc con atrap aere retroesternal retrocardiac . no visualiz metastasis .",
    "RNN_model",
    "['COPD signs', ' air trapping']",
    "['loc retrocardiac']",
    "['COPD signs', ' air trapping', 'loc retrocardiac', 'normal']",
    "['C0024117' 'C0231819']",
    "[]",
)
_UNCHANGED = (
    " sin grand cambi con respect estudi previ ayer con comp .",
    "Physician",
    "['unchanged']",
    "[]",
    "[['unchanged']]",
    "[]",
    "[]",
)
_CALLUS = (
    " antigu fractur costal septim arco costal izquierd . rest sin alter .",
    "Physician",
    "['callus rib fracture']",
    "['loc rib', 'loc left']",
    "[['normal'], ['callus rib fracture', 'loc rib', 'loc left']]",
    "['C0006767']",
    "['C0035561' 'C0443246']",
)
_EMPTY = (
    " estabil lesion lii .",
    "RNN_model",
    "['']",
    "['loc left lower lobe']",
    "['', 'loc left lower lobe']",
    "['']",
    "['C1261077']",
)

_MANUAL, _CNN = "Manual review of DICOM fields", "resnet-50.t7"
#: Per patient: PatientSex_DICOM, PatientBirth, Pediatric.
PATIENTS = (
    ("F", "1930.0", "No"),
    ("M", "1951.0", "No"),
    ("F", "1942.0", "No"),
    ("M", "", "No"),
    ("O", "2009.0", "PED"),
    ("nan", "1960.0", "No"),
    ("F", "1975.0", "No"),
    ("M", "1938.0", "No"),
)
#: Per image: patient, study (of that patient), ImageID style (``uid``: a 38-digit study id
#: and a 6-character suffix; ``dcm``: a 45-digit one and ``NN-NNN-NNN``; ``spaced``: the same
#: with spaces around the hyphens), ImageDir, ViewPosition_DICOM, Projection,
#: MethodProjection, DICOM profile, report and label cells.
IMAGES = (
    (0, 0, "uid", "0", "POSTEROANTERIOR", "PA", _MANUAL, _IDC, _NORMAL),
    (0, 0, "uid", "0", "LATERAL", "L", _MANUAL, _IDC, _NORMAL),
    (1, 0, "uid", "1", "POSTEROANTERIOR", "PA", _MANUAL, _IDC, _CARDIO),
    (1, 0, "uid", "1", "LATERAL", "L", _MANUAL, _IDC, _CARDIO),
    (2, 0, "dcm", "54", "nan", "AP", _MANUAL, _PHILIPS, _TUBE_NORMAL),
    (2, 1, "dcm", "54", "nan", "AP_horizontal", _MANUAL, _PHILIPS10, _LINES),
    (3, 0, "dcm", "54", "nan", "PA", _MANUAL, _PHILIPS, _UNLABELLED),
    (4, 0, "dcm", "1", "nan", "PA", _CNN, _PHILIPS10, _PNEUMONIA),
    (5, 0, "spaced", "0", "nan", "PA", _MANUAL, _PHILIPS, _COPD),
    (6, 0, "dcm", "54", "nan", "AP_horizontal", _MANUAL, _PHILIPS, _UNCHANGED),
    (6, 1, "dcm", "54", "nan", "COSTAL", _MANUAL, _PHILIPS, _CALLUS),
    (7, 0, "uid", "1", "ANTEROPOSTERIOR", "AP", _MANUAL, _IDC, _EMPTY),
)
#: The image whose window cells are ``None`` (as 1,223 real rows have).
NO_WINDOW = 6

_DIGITS = "0123456789"
_SUFFIX = "abcdefghijklmnopqrstuvwxyz0123456789"


def _digits(rng: np.random.Generator, n: int) -> str:
    """``n`` random digits, the first not zero (PadChest's ids are integers as text)."""
    return str(int(rng.integers(1, 10))) + "".join(
        _DIGITS[int(i)] for i in rng.integers(0, 10, size=n - 1)
    )


def _study_id(rng: np.random.Generator, style: str) -> str:
    """A StudyID in one of the release's two spellings: a 38-digit number (``uid``), or a
    45-digit one derived from a DICOM UID (``2168401113669640`` and 29 digits)."""
    return _digits(rng, 38) if style == "uid" else "2168401113669640" + _digits(rng, 29)


def _image_id(rng: np.random.Generator, study: str, style: str) -> str:
    """``<StudyID>_<suffix>.png``: six letters/digits, or ``NN-NNN-NNN`` for the 45-digit ids
    (spelled with spaces around the hyphens for the ``spaced`` style)."""
    if style == "uid":
        return f"{study}_{''.join(_SUFFIX[int(i)] for i in rng.integers(0, 36, size=6))}.png"
    a, b, c = (int(rng.integers(0, 5)), int(rng.integers(0, 200)), int(rng.integers(0, 200)))
    joint = " - " if style == "spaced" else "-"
    return f"{study}_{a:02d}{joint}{b:03d}{joint}{c:03d}.png"


def _save_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit grayscale PNG (fixed options, no timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = pixels.shape
    image = Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    image.save(path, format="PNG", compress_level=1)


def make_padchest(root: Path, rng: np.random.Generator) -> Path:
    """Write a miniature PadChest under ``root/PadChest`` and return that folder."""
    ds = Path(root) / PADCHEST_FOLDER
    patients: dict[int, str] = {}
    studies: dict[tuple[int, int], tuple[str, str, str]] = {}  # study id, date, report id
    rows: list[list[str]] = []
    for n, (p, s, style, folder, view_dicom, projection, method, profile, texts) in enumerate(
        IMAGES
    ):
        sex, birth, pediatric = PATIENTS[p]
        patient = patients.setdefault(p, _digits(rng, 39))
        if (p, s) not in studies:
            year = 2014 if pediatric == "PED" else int(rng.integers(2009, 2017))
            date = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            studies[p, s] = (_study_id(rng, style), date, _digits(rng, 7))
        study, date, report_id = studies[p, s]
        image_id = _image_id(rng, study, style)
        modality, maker, photometric, representation, aspect, spacing, bits = profile
        width = 300 + int(rng.integers(-8, 9))
        height = 360 + int(rng.integers(-8, 9))
        if projection == "COSTAL":
            width, height = height, width  # a landscape rib view
        pixels = synthetic_radiograph(rng, width, height, bits=int(bits))
        _save_png16(ds / folder / image_id, pixels)
        top = 2 ** int(bits) - 1
        if n == NO_WINDOW:
            centre, span = "None", "None"
        elif bits == "10":  # as the real 10-bit rows write them: 5.115000e+02
            centre, span = f"{top / 2:.6e}", f"{float(top):.6e}"
        elif maker == "PhilipsMedicalSystems":
            centre, span = f"{top / 2:.1f}", f"{float(top):.1f}"  # 2047.5, 4095.0
        else:
            centre = str(int(rng.integers(1800, 2500)))
            span = str(int(rng.integers(2000, 2900)))
        idc = maker == "ImagingDynamicsCompanyLtd"
        exposure = ("250", "2", "2500", "10") if idc else ("None",) * 4
        relative = f"{rng.uniform(-1.8, 0.3):.2f}" if idc else str(int(rng.integers(300, 1500)))
        rows.append(
            [
                str(n),
                image_id,
                folder,
                date,
                study,
                patient,
                birth,
                sex,
                view_dicom,
                projection,
                method,
                pediatric,
                modality,
                maker,
                photometric,
                representation,
                aspect,
                spacing,
                bits,
                centre,
                span,
                str(height),
                str(width),
                *exposure,
                relative,
                report_id,
                *texts,
            ]
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quotes only cells with commas, as released
    writer.writerow(PADCHEST_HEADER)
    writer.writerows(rows)
    write_text(ds / PADCHEST_CSV, buffer.getvalue().splitlines())
    return ds


def make(dest: Path, rng: np.random.Generator) -> Path:
    return make_padchest(dest, rng)
