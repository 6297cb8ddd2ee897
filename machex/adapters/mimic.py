"""MIMIC-CXR (Beth Israel Deaconess Medical Center, via PhysioNet): 377,110 radiographs of 65,379
patients in 227,835 studies, each study with its free-text report.

Two releases (``../shared/datasets/SOURCES.md`` section 3), told apart by what is under the
root:

- MIMIC-CXR-JPG 2.0.0 (what MaCheX read): ``files/p<NN>/p<subject>/s<study>/<dicom_id>.jpg``
  beside ``mimic-cxr-2.0.0-metadata.csv.gz`` (``ViewPosition``), ``-split.csv.gz`` (the
  official ``train``/``validate``/``test`` split) and ``-chexpert.csv.gz`` /
  ``-negbio.csv.gz`` (study-level tri-state labels);
- MIMIC-CXR 2.0.0 (DICOM): the same tree of ``.dcm`` files (``.dcm.gz`` in the early layout),
  ``cxr-record-list.csv.gz`` (``subject_id, study_id, dicom_id, path``) and
  ``mimic-cxr-reports.zip``. It has no view and no split: the JPG release's metadata and
  split CSVs must be put beside its record list (a DICOM header's ``ViewPosition`` cannot be
  read at plan time without opening every file).

Where both image kinds are present, ``jpg`` is read unless ``--prefer dicom``; a root with
``cxr-record-list.csv`` and no JPEG beside the first rows is the DICOM release. Keys are
``mimic-p<subject>-s<study>-<dicom_id>`` in both, so the two builds agree.

Reports: ``s<study>.txt`` beside the study folder (``files/pNN/p<subject>/s<study>.txt``, as
the original MaCheX expected them), else in ``mimic-cxr-reports.zip`` at the root; or only
where ``--reports`` says (the zip, or its unpacked folder). Each study's ``Report`` is one
object shared by the study's images; sections come from ``machex.reports``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from machex.adapters.base import (
    DEFAULT_PLAN,
    FileFinder,
    MetadataError,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    csv_header,
    find_metadata,
    finish_plan,
    keep_views,
    make_key,
    read_metadata_csv,
    tri_state_labels,
    tri_state_native,
)
from machex.records import FINDINGS, ImageRecord, Label, Report
from machex.reports import mimic_report
from machex.tables import SourceTables

log = logging.getLogger(__name__)

METADATA = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
#: Label files, the first found wins: the CheXpert labeler's, else NegBio's (same layout).
LABEL_FILES = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-negbio.csv")
RECORD_LIST = "cxr-record-list.csv"
REPORTS_ZIP = "mimic-cxr-reports.zip"

#: The metadata columns read; ``Rows``/``Columns`` are not kept: the build records each
#: image's decoded size, and 243k extras dicts would cost memory for nothing new.
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "split")
RECORD_COLUMNS = ("subject_id", "study_id", "dicom_id", "path")
ID_COLUMNS = ("subject_id", "study_id")
#: The official split's values -> ours.
SPLITS = {"train": "train", "validate": "val", "test": "test"}
#: How many rows are looked at to tell a JPG tree from a DICOM one (``--prefer`` not given).
DETECT_ROWS = 50

_NUMBER = re.compile(r"(\d+)(?:\.0*)?")
_DICOM_ID = re.compile(r"[0-9A-Za-z]+(?:-[0-9A-Za-z]+)*")
#: ``.../p10/p10000032/s50414267.txt``: a report, found by its tail whatever the folders above.
_REPORT_TAIL = re.compile(r"(?:^|/)(p\d{2}/p(\d+)/s(\d+)\.txt)$")
_GROUP = re.compile(r"p\d{2}")

Study = tuple[str, str]  # (subject_id, study_id)


def study_folder(subject: str, study: str) -> str:
    """``files/p10/p10000032/s50414267``: the group folder is ``p`` + the subject's first two
    digits."""
    return f"files/p{subject[:2]}/p{subject}/s{study}"


def _ids(frame: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    """Normalise id columns in place: stripped, whole numbers (``10000032.0`` -> ``10000032``);
    anything else is an error naming the row."""
    for column in columns:
        values = frame[column].str.strip()
        parts = values.str.extract(f"^{_NUMBER.pattern}$", expand=False)
        bad = parts.isna()
        if bad.any():
            row = frame.index[bad][0]
            raise MetadataError(
                f"{path} row {row + 2}: {column} {frame.at[row, column]!r} is not a number "
                f"(MIMIC-CXR {column}s are 8-digit numbers)"
            )
        frame[column] = parts


def _dicom_ids(frame: pd.DataFrame, path: Path) -> None:
    values = frame["dicom_id"].str.strip()
    bad = ~values.str.fullmatch(_DICOM_ID.pattern)
    if bad.any():
        row = frame.index[bad][0]
        raise MetadataError(
            f"{path} row {row + 2}: dicom_id {frame.at[row, 'dicom_id']!r} is not an id "
            "(expected 5 dash-separated groups of hex digits)"
        )
    frame["dicom_id"] = values


def read_split(path: Path) -> dict[str, str]:
    """``{dicom_id: our split}`` from the official split CSV; a value other than ``train``,
    ``validate``, ``test`` or one image in two splits is an error naming the row."""
    frame = read_metadata_csv(path, SPLIT_COLUMNS, usecols=SPLIT_COLUMNS)
    _dicom_ids(frame, path)
    values = frame["split"].str.strip()
    bad = ~values.isin(list(SPLITS))
    if bad.any():
        row = frame.index[bad][0]
        raise MetadataError(
            f"{path} row {row + 2}: split {frame.at[row, 'split']!r}; expected one of "
            f"{list(SPLITS)}"
        )
    split: dict[str, str] = {}
    for row, dicom_id, value in zip(frame.index, frame["dicom_id"], values.map(SPLITS)):
        if split.setdefault(dicom_id, value) != value:
            raise MetadataError(
                f"{path} row {row + 2}: dicom_id {dicom_id} is in split {value!r} here and "
                f"{split[dicom_id]!r} above"
            )
    return split


def read_labels(
    path: Path, tables: SourceTables, studies: set[Study]
) -> dict[Study, tuple[dict[str, Label], tuple[str, ...]]]:
    """``{(subject, study): (unified labels, native cells)}`` for ``studies``, from a
    study-level CheXpert/NegBio label CSV. The dicts are shared by the study's images."""
    label_columns = tuple(tables.label_map)
    frame = read_metadata_csv(path, ID_COLUMNS + label_columns)
    _ids(frame, ID_COLUMNS, path)
    keys = list(zip(frame["subject_id"], frame["study_id"]))
    wanted = [key in studies for key in keys]
    frame = frame[wanted]
    keys = [key for key, keep in zip(keys, wanted) if keep]
    first: dict[Study, int] = {}
    unique = []
    for position, (row, key) in enumerate(zip(frame.index, keys)):
        if key not in first:
            first[key] = position
            unique.append(position)
        elif not frame.iloc[position].equals(frame.iloc[first[key]]):
            raise MetadataError(
                f"{path} rows {frame.index[first[key]] + 2} and {row + 2}: study {key[1]} of "
                f"subject {key[0]} has different labels"
            )
    if len(unique) < len(frame):  # exact repeats: one is enough
        frame = frame.iloc[unique]
        keys = [keys[i] for i in unique]
    labels = tri_state_labels(frame, tables, str(path))
    return dict(zip(keys, zip(labels, tri_state_native(frame, label_columns))))


class ReportStore:
    """Reads the ``s<study>.txt`` reports from folders (``<base>/pNN/p<subject>/s<study>.txt``)
    and zips (members found by that tail), in order: the first that has a study wins."""

    def __init__(self, root: Path, reports: Path | None) -> None:
        self.folders: list[FileFinder] = []
        self.zips: list[tuple[zipfile.ZipFile, dict[str, str]]] = []
        self.where: list[str] = []
        if reports is not None:
            self._add_given(Path(reports).expanduser())
        else:
            self.folders.append(FileFinder(root / "files"))
            self.where.append(str(root / "files"))
            if (root / REPORTS_ZIP).is_file():
                self._add_zip(root / REPORTS_ZIP, given=False)

    def _add_given(self, reports: Path) -> None:
        if reports.is_dir():
            base = report_base(reports)
            if base is None:
                raise MetadataError(
                    f"--reports {reports}: no p10..p19 folders of s<study>.txt reports in it, "
                    "in its files/ or one folder below (expected the unpacked "
                    "mimic-cxr-reports.zip)"
                )
            self.folders.append(FileFinder(base))
            self.where.append(str(base))
        elif reports.is_file():
            self._add_zip(reports, given=True)
        else:
            raise MetadataError(f"--reports {reports} does not exist")

    def _add_zip(self, path: Path, *, given: bool) -> None:
        try:
            archive = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as error:
            raise MetadataError(f"{path}: cannot read as a zip file ({error})") from None
        index: dict[str, str] = {}
        for name in archive.namelist():
            match = _REPORT_TAIL.search(name)
            if match:
                index.setdefault(match.group(1), name)
        if not index and given:
            archive.close()
            raise MetadataError(
                f"--reports {path}: no files/pNN/p<subject>/s<study>.txt members "
                "(expected the official mimic-cxr-reports.zip)"
            )
        self.zips.append((archive, index))
        self.where.append(str(path))

    def read(self, subject: str, study: str) -> str | None:
        """The report text as released (UTF-8; an undecodable byte becomes U+FFFD), or None
        where no location has the study or its file is empty."""
        tail = f"p{subject[:2]}/p{subject}/s{study}.txt"
        data = None
        for finder in self.folders:
            found = finder.find(tail)
            if found is not None:
                data = Path(found).read_bytes()
                break
        else:
            for archive, index in self.zips:
                if tail in index:
                    data = archive.read(index[tail])
                    break
        if data is None:
            return None
        text = data.decode("utf-8", errors="replace")
        return text if text.strip() else None

    def close(self) -> None:
        for archive, _ in self.zips:
            archive.close()


def report_base(folder: Path) -> Path | None:
    """The folder holding the ``pNN`` group folders: ``folder`` or its ``files/``, else the
    one such folder one level below (``mimic-cxr-reports/files``); several there are an
    error, never a guess."""

    def holds_groups(candidate: Path) -> bool:
        return candidate.is_dir() and any(
            _GROUP.fullmatch(c.name) and c.is_dir() for c in candidate.iterdir()
        )

    for candidate in (folder, folder / "files"):
        if holds_groups(candidate):
            return candidate
    below = [
        candidate
        for child in sorted(c for c in folder.iterdir() if c.is_dir())
        for candidate in (child, child / "files")
        if holds_groups(candidate)
    ]
    if len(below) > 1:
        raise MetadataError(
            f"--reports {folder} holds several report trees: {[str(b) for b in below]}; "
            "point --reports at the one to read"
        )
    return below[0] if below else None


class MimicAdapter(SourceAdapter):
    name = "mimic"
    aliases = ("mimic-cxr", "mimic-cxr-jpg")
    title = "MIMIC-CXR (Beth Israel Deaconess Medical Center)"
    homepage = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
    licence = "PhysioNet Credentialed Health Data License 1.5.0"
    citation = (
        "Johnson A.E.W. et al. MIMIC-CXR, a de-identified publicly available database of chest "
        "radiographs with free-text reports. Scientific Data 6, 317 (2019); Johnson A.E.W. et "
        "al. MIMIC-CXR-JPG, a large publicly available database of labeled chest radiographs. "
        "arXiv:1901.07042 (2019)."
    )
    metadata_files = (f"{METADATA}|{RECORD_LIST}",)
    image_formats = ("jpg", "dicom")
    separate_reports = True

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        metadata_path = find_metadata(root, METADATA)
        record_path = find_metadata(root, RECORD_LIST)
        if metadata_path is None:  # locate_root found the record list: the DICOM release
            raise MetadataError(
                f"{root}: the DICOM release ({RECORD_LIST}) has no view and no split; copy "
                f"{METADATA}.gz and {SPLIT}.gz from MIMIC-CXR-JPG 2.0.0 beside it (the view "
                "filter needs their ViewPosition: a DICOM header's is not read at plan time)"
            )
        split_path = find_metadata(root, SPLIT)
        if split_path is None:
            raise MetadataError(
                f"{root}: {SPLIT}(.gz) not found; it holds the official train/validate/test "
                "split (MIMIC-CXR-JPG ships it beside the metadata CSV)"
            )
        skipped: Counter[str] = Counter()
        warnings: list[str] = []

        header = csv_header(metadata_path)
        frame = read_metadata_csv(
            metadata_path,
            METADATA_COLUMNS,
            usecols=[c for c in header if c in METADATA_COLUMNS],
        )
        _ids(frame, ID_COLUMNS, metadata_path)
        _dicom_ids(frame, metadata_path)

        fmt = options.prefer or self._detect_format(root, frame, record_path, warnings)
        paths: pd.Series | None = None
        if fmt == "dicom" and record_path is not None:
            frame, paths = self._join_record_list(record_path, frame, skipped)

        frame = keep_views(frame, "ViewPosition", tables, skipped, options.views)
        split_of = read_split(split_path)
        splits = frame["dicom_id"].map(split_of)
        if splits.isna().any():
            skipped["not_in_split_csv"] += int(splits.isna().sum())
            warnings.append(
                f"{int(splits.isna().sum())} images are not in {split_path.name}: skipped"
            )
            frame, splits = frame[splits.notna()], splits[splits.notna()]

        studies = sorted(set(zip(frame["subject_id"], frame["study_id"])))
        labels = self._labels(root, tables, set(studies), warnings)
        reports = self._reports(root, options.reports, studies, warnings)

        no_labels: tuple[dict[str, Label], tuple[str, ...]] = ({f: None for f in FINDINGS}, ())
        files = FileFinder(root)
        suffix = ".jpg" if fmt == "jpg" else ".dcm"
        listed = paths[frame.index].tolist() if paths is not None else [""] * len(frame)
        records: list[ImageRecord] = []
        rows = zip(
            frame["subject_id"].tolist(),
            frame["study_id"].tolist(),
            frame["dicom_id"].tolist(),
            frame["ViewPosition"].tolist(),
            splits.tolist(),
            listed,
        )
        for subject, study, dicom_id, view, split, given in rows:
            relative = given or f"{study_folder(subject, study)}/{dicom_id}{suffix}"
            found = files.find(relative)
            if found is None and fmt == "dicom":  # the early layout kept gzipped DICOMs
                found = files.find(f"{relative}.gz")
            row_labels, row_native = labels.get((subject, study), no_labels)
            records.append(
                ImageRecord(
                    key=make_key(self.name, f"p{subject}", f"s{study}", dicom_id),
                    source=self.name,
                    source_key=relative,
                    path=found,
                    patient_id=subject,
                    study_id=study,
                    view=view.strip(),
                    split=split,
                    labels=row_labels,
                    native_labels=row_native,
                    report=reports.get((subject, study)),
                )
            )
        return finish_plan(self.name, root, records, skipped, tables, warnings)

    @staticmethod
    def _detect_format(
        root: Path, frame: pd.DataFrame, record_path: Path | None, warnings: list[str]
    ) -> str:
        """``jpg`` unless the root is the DICOM release: it has the record list, and the first
        rows' images are DICOMs, or no JPEG of them is there."""
        if record_path is None:
            return "jpg"
        files = FileFinder(root)
        head = frame.head(DETECT_ROWS)
        for subject, study, dicom_id in zip(head["subject_id"], head["study_id"], head["dicom_id"]):
            stem = f"{study_folder(subject, study)}/{dicom_id}"
            if files.find(f"{stem}.jpg"):
                return "jpg"
            if files.find(f"{stem}.dcm") or files.find(f"{stem}.dcm.gz"):
                break
        warnings.append(
            f"images: DICOM ({record_path.name} and no .jpg for the first rows); "
            "--prefer jpg reads JPEGs"
        )
        return "dicom"

    @staticmethod
    def _join_record_list(
        record_path: Path, metadata: pd.DataFrame, skipped: Counter[str]
    ) -> tuple[pd.DataFrame, pd.Series]:
        """The DICOM release's images (its record list) with the JPG metadata's view; images
        the metadata does not list are skipped as ``not_in_metadata_csv``."""
        records = read_metadata_csv(record_path, RECORD_COLUMNS, usecols=RECORD_COLUMNS)
        _ids(records, ID_COLUMNS, record_path)
        _dicom_ids(records, record_path)
        view = metadata.drop(columns=list(ID_COLUMNS)).drop_duplicates("dicom_id")
        joined = records.merge(view, on="dicom_id", how="left", indicator=True)
        missing = joined["_merge"] == "left_only"
        if missing.any():
            skipped["not_in_metadata_csv"] += int(missing.sum())
        joined = joined[~missing].drop(columns="_merge")
        return joined, joined["path"].str.strip()

    @staticmethod
    def _labels(
        root: Path, tables: SourceTables, studies: set[Study], warnings: list[str]
    ) -> dict[Study, tuple[dict[str, Label], tuple[str, ...]]]:
        for position, name in enumerate(LABEL_FILES):
            path = find_metadata(root, name)
            if path is not None:
                if position:
                    warnings.append(f"labels: {path.name} ({LABEL_FILES[0]} not found)")
                return read_labels(path, tables, studies)
        warnings.append(f"labels: none of {list(LABEL_FILES)} found: every label is null")
        return {}

    @staticmethod
    def _reports(
        root: Path, given: Path | None, studies: list[Study], warnings: list[str]
    ) -> dict[Study, Report]:
        store = ReportStore(root, given)
        reports: dict[Study, Report] = {}
        try:
            for subject, study in studies:
                text = store.read(subject, study)
                if text is not None:
                    reports[(subject, study)] = mimic_report(study, text)
        finally:
            store.close()
        log.info("mimic: %d of %d reports found in %s", len(reports), len(studies), store.where)
        if studies and not reports:
            warnings.append(
                f"no report found in {store.where}; --reports takes mimic-cxr-reports.zip or "
                "its unpacked folder"
            )
        return reports
