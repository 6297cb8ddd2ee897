"""ChestX-ray14 (NIH Clinical Center): 112,120 PNGs of 30,805 patients, 14 NLP-mined labels.

Layout (``../shared/datasets/SOURCES.md`` section 1): ``Data_Entry_2017_v2020.csv`` (or the older
``Data_Entry_2017.csv``), ``train_val_list.txt`` / ``test_list.txt`` (the official,
patient-disjoint split), ``BBox_List_2017.csv`` and the images either in one flat ``images/`` or
in the Kaggle mirror's ``images_NNN/images/`` folders.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from machex.adapters.base import (
    DEFAULT_PLAN,
    MetadataError,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    closed_set_labels,
    find_metadata,
    finish_plan,
    index_files,
    keep_views,
    make_key,
    parse_numbers,
    read_metadata_csv,
)
from machex.records import BoxRecord, ImageRecord
from machex.tables import SourceTables

ENTRY_FILES = "Data_Entry_2017_v2020.csv|Data_Entry_2017.csv"
ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
# Two bracketed headers are split by their inner comma into two columns each.
ENTRY_EXTRAS = {
    "OriginalImage[Width": "csv_original_width",
    "Height]": "csv_original_height",
    "OriginalImagePixelSpacing[x": "pixel_spacing_x",
    "y]": "pixel_spacing_y",
}
SPLIT_LISTS = {"train_val_list.txt": "train", "test_list.txt": "test"}
BBOX_FILE = "BBox_List_2017.csv"
#: NIH boxes are given in the 1024x1024 frame of the released PNGs.
BBOX_FRAME = (1024, 1024)


def read_split_lists(root: Path) -> dict[str, str]:
    """``{image name: split}`` from the official list files (both required)."""
    splits: dict[str, str] = {}
    for name, split in SPLIT_LISTS.items():
        path = find_metadata(root, name)
        if path is None:
            raise MetadataError(
                f"{root / name} is missing: ChestX-ray14's official split needs "
                f"{list(SPLIT_LISTS)} beside {ENTRY_FILES.split('|')[0]}"
            )
        frame = pd.read_csv(path, header=None, names=["name"], dtype=str, keep_default_na=False)
        for image in frame["name"].str.strip():
            if image:
                splits.setdefault(image, split)
    return splits


def read_boxes(path: Path, tables: SourceTables) -> dict[str, list[BoxRecord]]:
    """Boxes by image name. The header line has nine fields (``Bbox [x,y,w,h],,,``) but every
    row has six, so the header is skipped and the columns named here. A box's unified
    finding is the first one ``labels.csv`` lists for its label."""
    try:
        frame = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            usecols=range(6),
            names=["image", "label", "x", "y", "w", "h"],
            dtype=str,
            keep_default_na=False,
        )
    except (ValueError, pd.errors.ParserError) as error:
        raise MetadataError(
            f"{path}: expected rows 'Image Index,Finding Label,x,y,w,h' ({error})"
        ) from None
    boxes: dict[str, list[BoxRecord]] = defaultdict(list)
    for row_number, row in enumerate(frame.itertuples(index=False), start=2):
        try:
            box = BoxRecord(
                label=row.label.strip(),
                x=float(row.x),
                y=float(row.y),
                width=float(row.w),
                height=float(row.h),
                frame=BBOX_FRAME,
                finding=next(iter(tables.label_map.get(row.label.strip(), ())), None),
            )
        except ValueError:
            raise MetadataError(f"{path} row {row_number}: non-numeric box {tuple(row)}") from None
        boxes[row.image.strip()].append(box)
    return boxes


class NIHAdapter(SourceAdapter):
    name = "chestxray14"
    aliases = ("nih",)
    title = "ChestX-ray14 (NIH Clinical Center)"
    homepage = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    licence = "No restrictions on use; cite the NIH Clinical Center and the paper (CC0-like terms)"
    citation = (
        "Wang X. et al. ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks. CVPR 2017."
    )
    metadata_files = (ENTRY_FILES,)

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        entry_path = find_metadata(root, ENTRY_FILES)
        assert entry_path is not None  # locate_root checked it
        frame = read_metadata_csv(entry_path, ENTRY_COLUMNS)
        splits = read_split_lists(root)
        warnings: list[str] = []
        box_path = find_metadata(root, BBOX_FILE)
        if box_path is None:
            warnings.append(f"{root / BBOX_FILE} not found: no boxes will be recorded")
            boxes: dict[str, list[BoxRecord]] = {}
        else:
            boxes = read_boxes(box_path, tables)

        images = index_files(
            [
                root / "images",
                *sorted(root.glob("images_*/images")),
                *sorted(root.glob("images_*")),
            ],
            ".png",
        )
        skipped: Counter[str] = Counter()
        frame = keep_views(frame, "View Position", tables, skipped, options.views)

        # Column-wise: numbers parsed once per column, labels once per distinct label string.
        extras = {"follow_up": parse_numbers(frame["Follow-up #"])} | {
            ENTRY_EXTRAS[c]: parse_numbers(frame[c]) for c in ENTRY_EXTRAS if c in frame.columns
        }
        extra_rows = [dict(zip(extras, values)) for values in zip(*extras.values())]
        label_sets: dict[str, tuple[tuple[str, ...], dict]] = {}
        columns = zip(
            frame.index + 2,
            frame["Image Index"],
            frame["Finding Labels"],
            frame["Patient ID"],
            frame["Follow-up #"],
            frame["View Position"],
            frame["Patient Gender"],
            parse_numbers(frame["Patient Age"]),
            extra_rows,
        )
        records: list[ImageRecord] = []
        for row_number, name, text, patient, follow_up, view, sex, age, row_extras in columns:
            name = name.strip()
            split = splits.get(name)
            if split is None:
                skipped["not_in_official_split"] += 1
                continue
            if text not in label_sets:
                native = tuple(n.strip() for n in text.split("|") if n.strip())
                try:
                    label_sets[text] = (native, closed_set_labels(native, tables))
                except KeyError as unknown:
                    raise MetadataError(
                        f"{entry_path} row {row_number}: unknown label {unknown} in "
                        f"'Finding Labels'; known: {sorted(tables.label_map)}"
                    ) from None
            native, labels = label_sets[text]
            patient = patient.strip()
            records.append(
                ImageRecord(
                    key=make_key(self.name, name.removesuffix(".png")),
                    source=self.name,
                    # As in the official release, whichever mirror layout the file sits in.
                    source_key=f"images/{name}",
                    path=images.get(name),
                    patient_id=patient,
                    study_id=f"{patient}_{follow_up.strip()}",
                    view=view.strip(),
                    split=split,
                    sex=sex.strip() or None,
                    age=age,
                    labels=dict(labels),
                    native_labels=native,
                    boxes=tuple(boxes.get(name, ())),
                    extras=row_extras,
                )
            )
        return finish_plan(self.name, root, records, skipped, tables, warnings)
