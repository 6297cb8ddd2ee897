"""BRAX (Hospital Israelita Albert Einstein): 40,967 radiographs of 19,351 patients, 14
CheXpert-style tri-state labels mined from Portuguese reports.

Layout (``../shared/datasets/SOURCES.md`` section 5), PhysioNet v1.1.0::

    <root>/                                  # e.g. brax/1.1.0/ as downloaded
      master_spreadsheet_update.csv          # v1.1.0; or master_spreadsheet.csv
      images/id_<PatientID>/Study_<UID>/Series_<UID>/image-<UID>.png             # 16-bit
      Anonymized_DICOMs/id_<PatientID>/Study_<UID>/Series_<UID>/image-<UID>.dcm

One CSV row per image; ``PngPath`` / ``DicomPath`` are relative to the root, prefix included.
The original MaCheX code dropped the last 7 characters of ``PngPath`` before reading it (the
reason is not documented), so each path is resolved by rules, in order: as given, minus its
last 7 characters, then by its ``image-<UID>`` name anywhere below ``images/`` (or
``Anonymized_DICOMs/``). The count per rule is ``SourcePlan.path_rules``. There is no official
split (every image is ``train``), no report and no box; ``StudyDate`` is fictitious and unread.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

from machex.adapters.base import (
    DEFAULT_PLAN,
    FileFinder,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    find_metadata,
    finish_plan,
    keep_views,
    make_key,
    parse_numbers,
    read_metadata_csv,
    tri_state_labels,
    tri_state_native,
)
from machex.records import ImageRecord
from machex.tables import SourceTables

log = logging.getLogger(__name__)

METADATA = "master_spreadsheet_update.csv|master_spreadsheet.csv"
COLUMNS = (
    "DicomPath",
    "PngPath",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "ViewPosition",
)
#: Optional columns kept in ``extras`` (``StudyDate`` is fictitious and deliberately left out).
EXTRA_NUMBERS = {"Rows": "csv_rows", "Columns": "csv_columns"}
#: format -> (path column, image folder, file suffix)
FORMATS = {
    "png": ("PngPath", "images", ".png"),
    "dicom": ("DicomPath", "Anonymized_DICOMs", ".dcm"),
}
#: Characters the original MaCheX code cut from the end of ``PngPath`` (``path_offset = 7``).
JUNK_SUFFIX = 7
#: Path rules in the order they are tried; every one is reported, zeros included.
PATH_RULES = ("as_given", "minus_7_chars", "by_name", "missing")
#: ``0``, ``5``, ... ``80`` and ``85 or more``: the bin start is the age.
AGE_BIN = re.compile(r"(\d+(?:\.\d+)?)(?:\s*or\s+more)?", re.IGNORECASE)


def parse_age_bin(text: str) -> int | float | None:
    """The start of a 5-year age bin (``85 or more`` -> 85); None when blank or unreadable."""
    match = AGE_BIN.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match.group(1))
    return int(value) if value.is_integer() else value


def image_stem(relative: str, suffix: str) -> str:
    """``image-<UID>`` from a metadata path, with or without the 7 trailing junk characters;
    the file name without its last extension when neither ends in ``suffix``."""
    name = relative.rsplit("/", 1)[-1]
    for candidate in (name, name[:-JUNK_SUFFIX]):
        if candidate.lower().endswith(suffix):
            return candidate[: -len(suffix)]
    return os.path.splitext(name)[0] or name


def index_stems(folder: Path, suffix: str) -> dict[str, str]:
    """``{file stem: path}`` for every ``suffix`` file below ``folder``, in one sorted walk (the
    first path in sorted order wins a repeated name, whatever the file system's order)."""
    index: dict[str, str] = {}
    for current, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(suffix):
                index.setdefault(name[: -len(suffix)], os.path.join(current, name))
    return index


class PathResolver:
    """Finds a metadata path on disk by the rules in ``PATH_RULES`` and counts which matched."""

    def __init__(self, root: Path, folder: str, suffix: str) -> None:
        self.files = FileFinder(root)
        self.folder = root / folder
        self.suffix = suffix
        self.by_name: dict[str, str] | None = None  # built on the first miss
        self.counts: Counter[str] = Counter({rule: 0 for rule in PATH_RULES})

    def resolve(self, relative: str, stem: str) -> str | None:
        found, rule = self._find(relative, stem)
        self.counts[rule] += 1
        return found

    def _find(self, relative: str, stem: str) -> tuple[str | None, str]:
        found = self.files.find(relative)
        if found is not None:
            return found, "as_given"
        trimmed = relative[:-JUNK_SUFFIX]
        # Only a cut that leaves a file of the right kind: never a truncated name.
        if trimmed.lower().endswith(self.suffix) and (found := self.files.find(trimmed)):
            return found, "minus_7_chars"
        if self.by_name is None:
            self.by_name = index_stems(self.folder, self.suffix)
        found = self.by_name.get(stem)
        return (found, "by_name") if found is not None else (None, "missing")


def _code(text: str) -> int | float | str | None:
    """A small metadata code as a number where it is one, else the stripped text."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


class BraxAdapter(SourceAdapter):
    name = "brax"
    title = "BRAX (Hospital Israelita Albert Einstein)"
    homepage = "https://physionet.org/content/brax/1.1.0/"
    licence = "PhysioNet Credentialed Health Data License 1.5.0"
    citation = (
        "Reis E.P. et al. BRAX, Brazilian labeled chest x-ray dataset. "
        "Scientific Data 9, 487 (2022)."
    )
    metadata_files = (METADATA,)
    image_formats = ("png", "dicom")

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        fmt = self.check_format(options.prefer)
        path_column, folder, suffix = FORMATS[fmt]
        path = find_metadata(root, METADATA)
        assert path is not None  # locate_root checked it
        label_columns = tuple(tables.label_map)
        frame = read_metadata_csv(path, COLUMNS + label_columns)
        skipped: Counter[str] = Counter()
        frame = keep_views(frame, "ViewPosition", tables, skipped, options.views)
        # Rows that cannot make a record: counted, not fatal.
        no_patient = frame["PatientID"].str.strip() == ""
        no_path = ~no_patient & (frame[path_column].str.strip() == "")
        for reason, rows in (("missing_patient_id", no_patient), (f"missing_{fmt}_path", no_path)):
            if rows.any():
                skipped[reason] += int(rows.sum())
        frame = frame[~(no_patient | no_path)]

        labels = tri_state_labels(frame, tables, str(path))
        native = tri_state_native(frame, label_columns)
        age_of = {v: parse_age_bin(v) for v in frame["PatientAge"].unique()}
        extras: dict[str, list] = {"age_bin": [v.strip() or None for v in frame["PatientAge"]]}
        for column, name in EXTRA_NUMBERS.items():
            if column in frame.columns:
                extras[name] = parse_numbers(frame[column])
        if "Manufacturer" in frame.columns:
            extras["manufacturer"] = [_code(v) for v in frame["Manufacturer"]]
        extra_rows = [
            {k: v for k, v in zip(extras, values) if v is not None}
            for values in zip(*extras.values())
        ]

        resolver = PathResolver(root, folder, suffix)
        records: list[ImageRecord] = []
        rows = zip(
            frame[path_column],
            frame["PatientID"],
            frame["AccessionNumber"],
            frame["ViewPosition"],
            frame["PatientSex"],
            (age_of[v] for v in frame["PatientAge"]),
            labels,
            native,
            extra_rows,
        )
        for raw, patient, accession, view, sex, age, row_labels, row_native, row_extras in rows:
            relative = raw.strip()
            stem = image_stem(relative, suffix)
            records.append(
                ImageRecord(
                    # The image UID names the same image in both formats: one key for both.
                    key=make_key(self.name, stem),
                    source=self.name,
                    source_key=relative,
                    path=resolver.resolve(relative, stem),
                    patient_id=patient.strip(),
                    study_id=accession.strip() or None,
                    view=view.strip(),
                    split="train",  # no official split
                    sex=sex.strip() or None,  # M / F / O as released
                    age=age,
                    labels=row_labels,
                    native_labels=row_native,
                    extras=row_extras,
                )
            )
        path_rules = dict(resolver.counts)
        log.info(
            "%s: %s paths resolved: %s",
            self.name,
            path_column,
            ", ".join(f"{rule} {n:,}" for rule, n in path_rules.items()),
        )
        return finish_plan(self.name, root, records, skipped, tables, path_rules=path_rules)
