"""Miniature MIMIC-CXR-JPG 2.0.0 in its real layout, its reports beside the study folders; and,
for tests, the matching DICOM release (``release="dicom"``).

The metadata and reports are credentialed, so every file is written from the documented
format (``../shared/datasets/SOURCES.md`` section 3), not copied: gzipped CSVs with the
documented headers, ids of the real shapes (8-digit subject ids starting with 1, study ids
starting with 5, dicom ids of 5 dash-separated groups of 8 hex digits) and report texts
written for this miniature in the MIMIC-CXR report format. Eleven images of six studies over
three subjects cover: PA, AP, ``LATERAL``, ``LL``, ``AP AXIAL`` and blank views; the three
official splits; a study without a CheXpert row; label cells ``1.0``/``0.0``/``-1.0``/blank;
a report with findings and impression, one without FINDINGS, one with an addendum on top,
one with header variants (``REASON FOR EXAMINATION``, ``COMPARISONS``, ``CONCLUSION``) and
one with a numbered impression; and a study without a report.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np

from machex.sample.common import save_image, synthetic_radiograph
from machex.sample.dicom import write_dicom

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "mimic"

JPG_FOLDER = ("mimic-cxr-jpg", "2.0.0")
DICOM_FOLDER = ("mimic-cxr", "2.0.0")

METADATA_HEADER = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
#: The 14 label columns of the chexpert/negbio CSVs: alphabetical, after subject and study.
LABEL_COLUMNS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
LABEL_HEADER = ("subject_id", "study_id", *LABEL_COLUMNS)
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
RECORD_HEADER = ("subject_id", "study_id", "dicom_id", "path")
STUDY_HEADER = ("subject_id", "study_id", "path")

#: ViewPosition -> ViewCodeSequence_CodeMeaning, as in the real metadata.
VIEW_MEANINGS = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "AP AXIAL": "antero-posterior",
    "": "",
}


def _lines(*lines: str) -> str:
    """A report as MIMIC-CXR writes it: each line one space in, blank lines a single space."""
    return "".join(f" {line}\n" for line in lines)


TITLE = "                                FINAL REPORT"
#: The reports of the miniature, by name (each study names one, or None: no .txt).
REPORTS: dict[str, str] = {
    "full": _lines(
        TITLE,
        "EXAMINATION:  CHEST (PA AND LAT)",
        "",
        "INDICATION:  ___F with cough and low-grade fever for one week.",
        "",
        "TECHNIQUE:  Chest PA and lateral",
        "",
        "COMPARISON:  None.",
        "",
        "FINDINGS: ",
        "",
        "The lungs are well expanded and clear.  There is no focal consolidation,",
        "pleural effusion or pneumothorax.  The cardiomediastinal silhouette and hilar",
        "contours are normal.  The visualized upper abdomen is unremarkable.",
        "",
        "IMPRESSION: ",
        "",
        "No acute cardiopulmonary process.",
    ),
    "impression_only": _lines(
        TITLE,
        "EXAMINATION:  CHEST (PORTABLE AP)",
        "",
        "INDICATION:  ___ year old man with shortness of breath.  // ? pulmonary edema",
        "",
        "COMPARISON:  Chest radiograph from ___.",
        "",
        "IMPRESSION: ",
        "",
        "Compared with the prior study, there is a mild increase in pulmonary vascular",
        "congestion without frank edema.  Small bilateral pleural effusions are",
        "unchanged.  No pneumothorax.",
    ),
    "addendum": _lines(
        "                               FINAL ADDENDUM",
        "ADDENDUM:",
        "",
        "The findings were discussed with Dr. ___ by Dr. ___ by telephone on ___ at",
        "4:10 PM, 5 minutes after discovery.",
        "",
        "_" * 78,
        TITLE,
        "EXAMINATION:  CHEST (PORTABLE AP)",
        "",
        "INDICATION:  ___ with fever, evaluate for pneumonia.",
        "",
        "TECHNIQUE:  Single portable AP view of the chest.",
        "",
        "COMPARISON:  ___.",
        "",
        "FINDINGS: ",
        "",
        "New opacity in the right lower lobe obscures the right hemidiaphragm and is",
        "concerning for pneumonia.  The left lung is clear.  Heart size is normal.",
        "",
        "IMPRESSION: ",
        "",
        "Right lower lobe pneumonia.",
    ),
    "variants": _lines(
        TITLE,
        "PA AND LATERAL CHEST RADIOGRAPH",
        "",
        "REASON FOR EXAMINATION:  Evaluation of the patient with cough since ___.",
        "",
        "COMPARISONS:  ___ and ___.",
        "",
        "FINDINGS:  The heart is mildly enlarged.  The mediastinal and hilar contours",
        "are unremarkable.  A left-sided dual-lead pacemaker is unchanged in position",
        "since ___  .  There is no pleural effusion or pneumothorax.",
        "",
        "Degenerative changes are present in the thoracic spine.",
        "",
        "CONCLUSION:  Mild cardiomegaly without acute cardiopulmonary abnormality.",
        "",
        "RECOMMENDATION(S):  Follow-up radiograph in ___ weeks.",
    ),
    "numbered": _lines(
        TITLE,
        "HISTORY:  ___-year-old woman with lung cancer, now with chest pain.",
        "",
        "FINDINGS: ",
        "",
        "Portable AP upright view of the chest.  A right internal jugular central",
        "venous catheter ends in the mid SVC.  There is a moderate right pleural",
        "effusion with adjacent atelectasis.  The left lung is clear.",
        "",
        "IMPRESSION: ",
        "",
        "1.  Moderate right pleural effusion with adjacent atelectasis.",
        "2.  Right internal jugular catheter ending in the mid SVC.  No",
        "pneumothorax.",
        "",
        "NOTIFICATION:  The findings were communicated to ___ by ___ on ___ at ___.",
    ),
}

#: Per subject (group folder digit), its studies: (official split, ViewPosition per image,
#: report name or None, whether the chexpert/negbio CSVs have a row for the study).
SUBJECTS: tuple[tuple[int, tuple[tuple[str, tuple[str, ...], str | None, bool], ...]], ...] = (
    (0, (("train", ("PA", "LATERAL"), "full", True), ("train", ("AP",), "impression_only", True))),
    (2, (("validate", ("AP", "LL"), "addendum", True), ("train", ("PA", ""), None, False))),
    (
        9,
        (
            ("test", ("PA", "LATERAL"), "variants", True),
            ("test", ("AP", "AP AXIAL"), "numbered", True),
        ),
    ),
)


def _gzip_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A CSV gzipped as PhysioNet ships it (no name or time in the gzip header)."""
    text = "".join(",".join(cells) + "\n" for cells in (header, *rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))


def _labels(rng: np.random.Generator) -> tuple[str, ...]:
    """14 label cells in alphabetical column order; No Finding set only when nothing else is
    positive or uncertain; at least one cell uncertain."""
    choices = ("", "", "", "0.0", "1.0", "-1.0")
    cells = [choices[int(rng.integers(len(choices)))] for _ in LABEL_COLUMNS]
    cells[LABEL_COLUMNS.index("Edema")] = "-1.0"
    others = [c for name, c in zip(LABEL_COLUMNS, cells) if name not in ("No Finding",)]
    cells[LABEL_COLUMNS.index("No Finding")] = "" if {"1.0", "-1.0"} & set(others) else "1.0"
    return tuple(cells)


def write_zip(path: Path, members: dict[str, str]) -> None:
    """A zip of text members with fixed dates, so the bytes depend on the content only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, members[name])
    path.write_bytes(buffer.getvalue())


def make_mimic(dest: Path, rng: np.random.Generator, *, release: str = "jpg") -> Path:
    """Write a miniature MIMIC-CXR-JPG under ``dest/mimic-cxr-jpg/2.0.0`` (reports beside the
    study folders), or with ``release="dicom"`` the DICOM release under
    ``dest/mimic-cxr/2.0.0`` (``.dcm`` files, one ``.dcm.gz``, the record and study lists and
    ``mimic-cxr-reports.zip``; no view or split file, as released). The same ``rng`` state
    gives the same ids in both. Returns the release folder."""
    if release not in ("jpg", "dicom"):
        raise ValueError(f"release must be 'jpg' or 'dicom', not {release!r}")
    ds = Path(dest).joinpath(*(JPG_FOLDER if release == "jpg" else DICOM_FOLDER))

    # Every id first, so both releases draw the same ones.
    plan = []
    for group, studies in SUBJECTS:
        subject = f"1{group}{int(rng.integers(10**5, 10**6))}"
        for split, views, report, labelled in studies:
            study = f"5{int(rng.integers(10**6, 10**7))}"
            ids = ["-".join(f"{int(rng.integers(2**32)):08x}" for _ in range(5)) for _ in views]
            plan.append((subject, study, split, tuple(zip(ids, views)), report, labelled))

    metadata, splits, labels, negbio, records, study_rows = [], [], [], [], [], []
    reports: dict[str, str] = {}
    for n, (subject, study, split, images, report, labelled) in enumerate(plan):
        folder = f"files/p{subject[:2]}/p{subject}/s{study}"
        date = f"21{int(rng.integers(10, 99))}0{1 + n % 9}1{n % 9}"
        procedure = "CHEST (PORTABLE AP)" if images[0][1] == "AP" else "CHEST (PA AND LAT)"
        for i, (dicom_id, view) in enumerate(images):
            width = 240 + int(rng.integers(-12, 13))
            height = 290 + int(rng.integers(-12, 13))
            if release == "jpg":
                save_image(
                    ds / folder / f"{dicom_id}.jpg", synthetic_radiograph(rng, width, height)
                )
                file = f"{folder}/{dicom_id}.jpg"
            else:
                pixels = synthetic_radiograph(rng, width, height, bits=12)
                file = f"{folder}/{dicom_id}.dcm"
                gzipped = n == 1  # the early layout kept gzipped DICOMs: one of them
                write_dicom(ds / (file + (".gz" if gzipped else "")), pixels, view_position=view)
            time = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{i:02d}.{n}25"
            orientation = "Recumbent" if view == "AP" else ("Erect" if view else "")
            metadata.append(
                (
                    dicom_id,
                    subject,
                    study,
                    procedure,
                    view,
                    str(height),
                    str(width),
                    date,
                    time,
                    procedure,
                    VIEW_MEANINGS[view],
                    orientation,
                )
            )
            splits.append((dicom_id, study, subject, split))
            records.append((subject, study, dicom_id, file))
        study_rows.append((subject, study, f"{folder}.txt"))
        if labelled:
            labels.append((subject, study, *_labels(rng)))
            negbio.append((subject, study, *_labels(rng)))
        if report is not None:
            reports[f"{folder}.txt"] = REPORTS[report]

    if release == "jpg":
        _gzip_csv(ds / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_HEADER, metadata)
        _gzip_csv(ds / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_HEADER, splits)
        _gzip_csv(ds / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_HEADER, labels)
        _gzip_csv(ds / "mimic-cxr-2.0.0-negbio.csv.gz", LABEL_HEADER, negbio)
        for relative, text in reports.items():  # beside the study folders, as MaCheX read them
            (ds / relative).write_text(text, encoding="utf-8", newline="\n")
    else:
        _gzip_csv(ds / "cxr-record-list.csv.gz", RECORD_HEADER, records)
        _gzip_csv(ds / "cxr-study-list.csv.gz", STUDY_HEADER, study_rows)
        write_zip(ds / "mimic-cxr-reports.zip", reports)
    return ds


def make(dest: Path, rng: np.random.Generator) -> Path:
    return make_mimic(dest, rng)
