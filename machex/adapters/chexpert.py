"""CheXpert (Stanford ML Group): 224,316 radiographs of 65,240 patients, 14 tri-state labels.

Layout (``../shared/datasets/SOURCES.md`` section 2): ``train.csv`` and ``valid.csv`` beside
``train/`` and ``valid/``. Their ``Path`` column starts with the release folder
(``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``), which is stripped, so the full and the small
release give the same keys.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from machex.adapters.base import (
    DEFAULT_PLAN,
    FileFinder,
    MetadataError,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    find_metadata,
    finish_plan,
    index_tails,
    keep_views,
    make_key,
    parse_numbers,
    read_metadata_csv,
    tri_state_labels,
    tri_state_native,
)
from machex.records import ImageRecord
from machex.tables import SourceTables

CSV_SPLITS = {"train.csv": "train", "valid.csv": "val"}
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
SEX = {"Male": "M", "Female": "F"}
# ``<anything>/train/patient00001/study1/view1_frontal.jpg`` -> the part from ``train/`` on.
RELATIVE_PATH = re.compile(r"(?:^|/)((?:train|valid)/(patient\d+)/(study\d+)/([^/]+)\.jpg)$")


class CheXpertAdapter(SourceAdapter):
    name = "chexpert"
    title = "CheXpert (Stanford ML Group)"
    homepage = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    licence = "Stanford University Dataset Research Use Agreement (registration required)"
    citation = (
        "Irvin J. et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels "
        "and Expert Comparison. AAAI 2019."
    )
    metadata_files = ("train.csv|valid.csv",)
    metadata_columns = {"train.csv": "Path", "valid.csv": "Path"}
    image_formats = ("jpg",)

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        skipped: Counter[str] = Counter()
        warnings: list[str] = []
        records: list[ImageRecord] = []
        label_columns = tuple(tables.label_map)
        files = FileFinder(root)
        tails: dict[str, str] | None = None  # patient/study/view.jpg -> path, built on a miss
        for csv_name, split in CSV_SPLITS.items():
            path = find_metadata(root, csv_name)
            if path is None:
                warnings.append(f"{root / csv_name} not found: no '{split}' images")
                continue
            frame = read_metadata_csv(path, COLUMNS + label_columns)
            frame = keep_views(frame, "Frontal/Lateral", tables, skipped, options.views)
            labels = tri_state_labels(frame, tables, str(path))
            native = tri_state_native(frame, label_columns)
            rows = zip(
                frame.index + 2,
                frame["Path"],
                frame["AP/PA"],
                frame["Frontal/Lateral"],
                frame["Sex"],
                parse_numbers(frame["Age"]),
                labels,
                native,
            )
            for row_number, raw_path, ap_pa, frontal, sex, age, row_labels, row_native in rows:
                match = RELATIVE_PATH.search(raw_path.strip())
                if match is None:
                    raise MetadataError(
                        f"{path} row {row_number}: Path {raw_path!r} is not "
                        "'<prefix>/train|valid/patientN/studyN/<view>.jpg'"
                    )
                relative, patient, study, stem = match.groups()
                found = files.find(relative)
                if found is None:  # e.g. unmerged AIMI batch folders: look up by the tail
                    if tails is None:
                        tails = index_tails(root, ".jpg", depth=3)
                    found = tails.get(f"{patient}/{study}/{stem}.jpg")
                records.append(
                    ImageRecord(
                        key=make_key(self.name, split, patient, study, stem),
                        source=self.name,
                        source_key=relative,
                        path=found,
                        patient_id=patient,
                        study_id=f"{patient}/{study}",
                        # Frontal rows with LL/RL in AP/PA are kept and recorded as such;
                        # laterals (--views) have a blank AP/PA.
                        view=ap_pa.strip() or _view_without_ap_pa(frontal),
                        split=split,
                        sex=SEX.get(sex.strip()),
                        age=age,
                        labels=row_labels,
                        native_labels=row_native,
                    )
                )
        return finish_plan(self.name, root, records, skipped, tables, warnings)


def _view_without_ap_pa(frontal_lateral: str) -> str:
    return "LATERAL" if frontal_lateral.strip() == "Lateral" else "UNKNOWN"
