"""PadChest (BIMCV, Hospital San Juan, Alicante): 160,861 16-bit PNGs of 67,625 patients, 193
label names mined from (stemmed) Spanish reports, the report of every study.

Layout (``../shared/datasets/SOURCES.md`` section 4)::

    <root>/
      PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv   # or .csv.gz
      <ImageDir>/<ImageID>          # as the numbered zips unpack: 0/ ... 50/, 54/
      images/<ImageID>              # or one flat folder (MaCheX, torchxrayvision)
      ...anywhere below/<ImageID>   # or any other arrangement: found by file name

One CSV row per image; its first column has an empty header (a row index) and is not read.
The view is ``Projection`` (the curated one; ``ViewPosition_DICOM`` is the raw, often empty
tag). ``Labels`` is a Python list literal as text (``['normal']``; literal ``nan`` when the
image was not labelled); names may carry a leading space and the list may hold ``''``, both
normalised away. ``source_key`` is ``<ImageDir>/<ImageID>`` whatever the layout on disk, so
``known_bad.csv`` matches every layout. There is no official split (every image is
``train``) and no box; each image carries its study's report (language ``es``).
"""

from __future__ import annotations

import ast
import logging
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from machex.adapters.base import (
    DEFAULT_PLAN,
    FileFinder,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    csv_header,
    find_metadata,
    finish_plan,
    keep_views,
    make_key,
    parse_numbers,
    read_metadata_csv,
)
from machex.records import FINDINGS, PATHOLOGIES, ImageRecord, Label, Report
from machex.tables import SourceTables

log = logging.getLogger(__name__)

METADATA = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Report",
    "Labels",
)
#: Optional columns kept in ``extras`` (small, and useful to filter or check a build by).
EXTRA_TEXTS = {
    "MethodProjection": "method_projection",
    "MethodLabel": "method_label",
    "Pediatric": "pediatric",
}
EXTRA_NUMBERS = {
    "ImageDir": "image_dir",
    "BitsStored_DICOM": "bits_stored",
    "WindowCenter_DICOM": "window_center",
    "WindowWidth_DICOM": "window_width",
}
#: Placeholder cells PadChest writes for "no value" (pandas' own ``str(nan)`` and ``None``).
PLACEHOLDERS = frozenset({"", "nan", "NaN", "None"})
#: Where an image is looked for, in order; every rule is reported, zeros included.
PATH_RULES = ("image_dir", "images", "by_name", "missing")
FLAT_FOLDER = "images"
SUFFIX = ".png"
#: A report with no letter or digit (``. . . .``) says nothing.
_WORDS = re.compile(r"[^\W_]")
#: How many examples a warning names.
EXAMPLES = 5


def cell(text: str) -> str | None:
    """A text cell stripped, ``None`` for blanks and PadChest's ``nan`` / ``None`` texts."""
    text = text.strip()
    return None if text in PLACEHOLDERS else text


def cells(column: pd.Series) -> list[str | None]:
    """``cell`` of every value of a column, computed once per distinct value (a plain list:
    pandas' ``map`` would turn ``None`` into NaN)."""
    lookup = {v: cell(v) for v in column.unique()}
    return [lookup[v] for v in column]


def parse_label_list(text: str) -> tuple[str, ...] | None:
    """The label names of a ``Labels`` cell, stripped, without blanks or repeats, in order:
    ``()`` for an unlabelled image (``nan``, blank, ``[]``, ``['']``); ``None`` when the cell
    is not a list literal of strings (a malformed row)."""
    text = text.strip()
    if text in PLACEHOLDERS:
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(dict.fromkeys(name for v in value if (name := v.strip())))


def unified_labels(native: tuple[str, ...], tables: SourceTables) -> dict[str, Label]:
    """The 14 findings of one image from its label names.

    No name (an unlabelled image), or only names that say nothing about findings
    (``uninformative.csv``: ``exclude``, ``unchanged``, ``suboptimal study``): every finding
    null. Otherwise a finding some name maps to is 1, the others take ``absent.csv``'s value;
    a name ``labels.csv`` does not list feeds nothing (the plan warns about it). PadChest
    tags report sentences, so ``normal`` may sit beside findings: No Finding is 0 whenever a
    pathology finding is 1.
    """
    if tables.says_nothing(native):
        return dict.fromkeys(FINDINGS)
    labels: dict[str, Label] = {f: tables.absent.get(f) for f in FINDINGS}
    for name in native:
        for finding in tables.label_map.get(name, ()):
            labels[finding] = 1
    if labels["No Finding"] == 1 and any(labels[f] == 1 for f in PATHOLOGIES):
        labels["No Finding"] = 0
    return labels


def study_ages(study_dates: pd.Series, births: pd.Series) -> list[int | None]:
    """Year of ``StudyDate_DICOM`` (``YYYYMMDD``) minus ``PatientBirth`` (a year as float
    text, ``1930.0``), vectorised; ``None`` where either is blank or unreadable, the birth
    year is not whole, or the result is negative."""
    years = pd.to_numeric(study_dates.str.strip().str[:4], errors="coerce")
    born = pd.to_numeric(births.str.strip(), errors="coerce")
    ages = (years - born.where(born.mod(1) == 0)).to_numpy(dtype=float)
    return [None if not age >= 0 else int(age) for age in ages.tolist()]


def index_pngs(root: Path) -> dict[str, str]:
    """``{file name: path}`` for every PNG anywhere below ``root``, in one sorted walk (the
    first path in sorted order wins a repeated name, whatever the file system's order)."""
    index: dict[str, str] = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(SUFFIX):
                index.setdefault(name, os.path.join(folder, name))
    return index


class ImageResolver:
    """Finds an image by the rules of ``PATH_RULES`` and counts which one matched: the
    official ``<ImageDir>/<ImageID>``, the flat ``images/<ImageID>``, then by name anywhere
    below the root (one walk, done on the first miss: with no images on disk it finds
    nothing at once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = FileFinder(root)
        self.by_name: dict[str, str] | None = None
        self.counts: Counter[str] = Counter(dict.fromkeys(PATH_RULES, 0))

    def resolve(self, folder: str, name: str) -> str | None:
        found, rule = self._find(folder, name)
        self.counts[rule] += 1
        return found

    def _find(self, folder: str, name: str) -> tuple[str | None, str]:
        if folder and (found := self.files.find(f"{folder}/{name}")):
            return found, "image_dir"
        if found := self.files.find(f"{FLAT_FOLDER}/{name}"):
            return found, "images"
        if self.by_name is None:
            self.by_name = index_pngs(self.root)
        found = self.by_name.get(name)
        return (found, "by_name") if found is not None else (None, "missing")


def _report(study: str, text: str, cache: dict[tuple[str, str], Report]) -> Report | None:
    """The study's report (one object per study and text), or None for an empty one."""
    text = text.strip()
    if text in PLACEHOLDERS or not _WORDS.search(text):
        return None
    key = (study, text)
    if key not in cache:
        # Stemmed Spanish, not prose: no sections, and never conditioning text by default.
        cache[key] = Report(study_id=study, language="es", text=text)
    return cache[key]


def _window(centre: float | int | None, width: float | int | None) -> tuple[float, float] | None:
    if centre is None or width is None:
        return None
    return float(centre), float(width)


class PadChestAdapter(SourceAdapter):
    name = "padchest"
    title = "PadChest (BIMCV, Hospital San Juan, Alicante)"
    homepage = "https://bimcv.cipf.es/bimcv-projects/padchest/"
    licence = "BIMCV registration; research use under the PadChest agreement accepted on download"
    citation = (
        "Bustos A. et al. PadChest: A large chest x-ray image dataset with multi-label "
        "annotated reports. Medical Image Analysis 66, 101797 (2020)."
    )
    metadata_files = (METADATA,)
    image_formats = ("png",)

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        path = find_metadata(root, METADATA)
        assert path is not None  # locate_root checked it
        # Read by name: the first column has an empty header, and 26 columns are not needed.
        # Only columns the header has are asked for, so a missing one is named as such.
        header = csv_header(path)
        wanted = dict.fromkeys((*COLUMNS, *EXTRA_TEXTS, *EXTRA_NUMBERS))
        frame = read_metadata_csv(path, COLUMNS, usecols=[c for c in header if c in wanted])
        skipped: Counter[str] = Counter()
        warnings: list[str] = []
        frame = keep_views(frame, "Projection", tables, skipped, options.views)

        # Rows that cannot make a record: counted, not fatal.
        no_image = frame["ImageID"].str.strip() == ""
        no_patient = ~no_image & (frame["PatientID"].str.strip().isin(PLACEHOLDERS))
        for reason, rows in (("missing_image_id", no_image), ("missing_patient_id", no_patient)):
            if rows.any():
                skipped[reason] += int(rows.sum())
        frame = frame[~(no_image | no_patient)]

        # Parsed once per distinct cell: a few tens of thousands of label lists for 160,861 rows.
        parsed = {text: parse_label_list(text) for text in frame["Labels"].unique()}
        natives = frame["Labels"].map(parsed)
        malformed = natives.isna()
        if malformed.any():
            rows = (frame.index[malformed] + 2).tolist()
            skipped["malformed_labels"] += len(rows)
            warnings.append(
                f"{path}: {len(rows)} rows whose Labels cell is not a list literal of names "
                f"were skipped (rows {rows[:EXAMPLES]}{' ...' if len(rows) > EXAMPLES else ''})"
            )
            frame, natives = frame[~malformed], natives[~malformed]

        extras: dict[str, list] = {}
        for column, key in EXTRA_NUMBERS.items():
            if column in frame.columns:
                extras[key] = parse_numbers(frame[column])
        for column, key in EXTRA_TEXTS.items():
            if column in frame.columns:
                extras[key] = cells(frame[column])
        extra_rows = [
            {k: v for k, v in zip(extras, values) if v is not None}
            for values in zip(*extras.values())
        ]

        # Per distinct label list: its findings, and its names labels.csv does not list.
        known = tables.label_map
        label_sets = {
            native: (unified_labels(native, tables), [n for n in native if n not in known])
            for native in dict.fromkeys(natives)
        }
        unknown: Counter[str] = Counter()
        reports: dict[tuple[str, str], Report] = {}
        resolver = ImageResolver(root)
        records: list[ImageRecord] = []
        rows = zip(
            frame["ImageID"],
            frame["ImageDir"],
            frame["PatientID"],
            frame["StudyID"],
            frame["Projection"],
            cells(frame["PatientSex_DICOM"]),
            study_ages(frame["StudyDate_DICOM"], frame["PatientBirth"]),
            frame["Report"],
            natives,
            extra_rows,
        )
        for name, folder, patient, study, view, sex, age, text, native, row_extras in rows:
            name, folder = name.strip(), folder.strip()
            study_id = cell(study)
            labels, unlisted = label_sets[native]
            if unlisted:
                unknown.update(unlisted)
            window = _window(row_extras.get("window_center"), row_extras.get("window_width"))
            records.append(
                ImageRecord(
                    key=make_key(self.name, name.removesuffix(SUFFIX)),
                    source=self.name,
                    source_key=f"{folder}/{name}" if folder else name,
                    path=resolver.resolve(folder, name),
                    patient_id=patient.strip(),
                    study_id=study_id,
                    view=view.strip(),
                    split="train",  # no official split
                    sex=sex,  # M / F / O as released
                    age=age,
                    labels=dict(labels),
                    native_labels=native,
                    report=_report(study_id, text, reports) if study_id else None,
                    extras=row_extras,
                    window=window,
                )
            )
        if unknown:
            names = [n for n, _ in unknown.most_common(EXAMPLES)]
            warnings.append(
                f"{path}: {len(unknown)} label names are not in manifests/{self.name}/labels.csv "
                f"({sum(unknown.values())} times); kept as native labels only, feeding no "
                f"finding: {names}{' ...' if len(unknown) > EXAMPLES else ''}"
            )
        path_rules = dict(resolver.counts)
        log.info(
            "%s: images resolved: %s",
            self.name,
            ", ".join(f"{rule} {n:,}" for rule, n in path_rules.items()),
        )
        return finish_plan(
            self.name, root, records, skipped, tables, warnings, path_rules=path_rules
        )
