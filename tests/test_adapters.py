"""Source adapters: a shared contract over the registry, then each source's quirks, on the
embedded sample and on the complete real metadata in ../shared/real/metadata."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pandas as pd
import pytest

from machex.adapters import ADAPTERS, MetadataError, get_adapter
from machex.adapters.base import read_metadata_csv
from machex.build import plan_source
from machex.records import FINDINGS, SPLITS


@pytest.mark.parametrize("source", sorted(ADAPTERS))
def test_adapter_contract(source: str, sample_roots_pristine: dict[str, Path]) -> None:
    plan = plan_source(source, sample_roots_pristine[source])
    assert plan.records, "the sample must yield records"
    keys = [r.key for r in plan.records]
    assert len(keys) == len(set(keys))
    assert keys == sorted(keys)
    for record in plan.records:
        assert "." not in record.key and record.key.startswith(f"{source}-")
        assert record.source == source
        assert record.split in SPLITS
        assert record.patient_id
        assert record.path is not None and Path(record.path).is_file()
        assert set(record.labels) == set(FINDINGS)
        assert set(record.labels.values()) <= {1, 0, -1, None}
    # Deterministic: planning twice gives the same records.
    assert plan_source(source, sample_roots_pristine[source]).records == plan.records


def test_aliases_and_unknown_sources() -> None:
    assert get_adapter("nih").name == "chestxray14"
    assert get_adapter("CheXpert").name == "chexpert"
    with pytest.raises(MetadataError, match="chestxray14"):
        get_adapter("mimic-cxr-v9")


# --- ChestX-ray14 -------------------------------------------------------------------------


def test_nih_splits_follow_the_official_lists(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["chestxray14"]
    train = set((root / "train_val_list.txt").read_text().split())
    test = set((root / "test_list.txt").read_text().split())
    plan = plan_source("nih", root)
    assert len(plan.records) == len(train) + len(test)
    for record in plan.records:
        name = Path(record.source_key).name
        assert record.split == ("train" if name in train else "test")
    # Kaggle layout on disk (images_NNN/images/), the official relative path as source_key,
    # so known_bad.csv entries match in either layout.
    assert all("/images_0" in r.path for r in plan.records)
    assert all(r.source_key == f"images/{Path(r.path).name}" for r in plan.records)


def test_nih_missing_split_list_fails_naming_the_file(sample_roots: dict[str, Path]) -> None:
    root = sample_roots["chestxray14"]
    (root / "test_list.txt").unlink()
    with pytest.raises(MetadataError, match="test_list.txt"):
        plan_source("nih", root)


def test_nih_old_data_entry_with_trailing_comma(sample_roots: dict[str, Path]) -> None:
    """The older Data_Entry_2017.csv has a trailing comma: an extra unnamed column."""
    root = sample_roots["chestxray14"]
    new = root / "Data_Entry_2017_v2020.csv"
    lines = new.read_text().splitlines()
    (root / "Data_Entry_2017.csv").write_text("\n".join(line + "," for line in lines) + "\n")
    expected = plan_source("nih", root).records
    new.unlink()
    assert plan_source("nih", root).records == expected


def test_nih_missing_columns_are_named(sample_roots: dict[str, Path]) -> None:
    root = sample_roots["chestxray14"]
    entry = root / "Data_Entry_2017_v2020.csv"
    frame = pd.read_csv(entry, dtype=str)
    frame.drop(columns=["View Position"]).to_csv(entry, index=False)
    with pytest.raises(
        MetadataError,
        match=r"Data_Entry_2017_v2020\.csv: missing columns "
        r"\['View Position'\]",
    ):
        plan_source("nih", root)


@pytest.fixture(scope="module")
def real_nih_plan(tmp_path_factory: pytest.TempPathFactory, real_metadata: Path):
    """The full real Data_Entry and BBox_List. The split lists are not in ../shared, so
    every image is listed in train_val_list.txt here: the split itself is tested above."""
    root = tmp_path_factory.mktemp("nih")
    for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"):
        shutil.copy(real_metadata / f"{name}.gz", root / f"{name}.gz")
    with gzip.open(real_metadata / "Data_Entry_2017_v2020.csv.gz", "rt") as handle:
        names = pd.read_csv(handle, usecols=["Image Index"])["Image Index"]
    (root / "train_val_list.txt").write_text("\n".join(names) + "\n")
    (root / "test_list.txt").write_text("")
    frame = pd.read_csv(real_metadata / "Data_Entry_2017_v2020.csv.gz", dtype=str)
    return plan_source("nih", root), frame


def test_nih_real_labels_match_the_csv(real_nih_plan) -> None:
    plan, frame = real_nih_plan
    assert plan.planned == len(frame) == 112_120
    assert plan.summary()["by_view"] == {"AP": 44_810, "PA": 67_310}
    labels = pd.DataFrame([r.labels for r in plan.records])

    def has(name: str) -> pd.Series:
        return frame["Finding Labels"].str.split("|").apply(lambda names: name in names)

    assert (labels["Pleural Effusion"] == 1).sum() == has("Effusion").sum() == 13_317
    assert (labels["Cardiomegaly"] == 1).sum() == has("Cardiomegaly").sum() == 2_776
    assert (labels["No Finding"] == 1).sum() == has("No Finding").sum() == 60_361
    assert (labels["Lung Lesion"] == 1).sum() == (has("Mass") | has("Nodule")).sum()
    assert (labels["Pleural Other"] == 1).sum() == has("Pleural_Thickening").sum()
    # Closed label set: an annotated finding that is absent is 0, never null ...
    assert labels["Pneumothorax"].isna().sum() == 0
    assert (labels["Pneumothorax"] == 0).sum() == len(frame) - has("Pneumothorax").sum()
    # ... and findings NIH never annotates are null, not negative.
    for finding in ("Enlarged Cardiomediastinum", "Fracture", "Support Devices"):
        assert labels[finding].isna().all()
    # Native labels kept verbatim, including the unmapped ones.
    hernia = sum("Hernia" in r.native_labels for r in plan.records)
    assert hernia == has("Hernia").sum() == 227


def test_nih_real_boxes(real_nih_plan) -> None:
    """BBox_List_2017.csv: 9 header fields over 6-field rows; 984 boxes on 880 images."""
    plan, _ = real_nih_plan
    boxes = [b for r in plan.records for b in r.boxes]
    assert len(boxes) == 984
    assert sum(1 for r in plan.records if r.boxes) == 880
    assert {b.label for b in boxes} == {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltrate",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    assert all(b.frame == (1024, 1024) for b in boxes)
    first = next(r for r in plan.records if r.key == "chestxray14-00013118_008")
    assert first.boxes[0].label == "Atelectasis"
    assert first.boxes[0].x == pytest.approx(225.084745762712)
    assert first.boxes[0].height == pytest.approx(79.1864406779661)


# --- CheXpert -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_chexpert_root(tmp_path_factory: pytest.TempPathFactory, real_metadata: Path) -> Path:
    """The real train.csv (gzipped, as the loader accepts) in a CheXpert-v1.0-small folder."""
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    root.mkdir()
    shutil.copy(real_metadata / "chexpert_train.csv.gz", root / "train.csv.gz")
    return root


@pytest.fixture(scope="module")
def real_chexpert_plan(real_chexpert_root: Path):
    return plan_source("chexpert", real_chexpert_root.parent)  # the parent folder works too


def test_chexpert_real_frontal_counts(real_chexpert_plan) -> None:
    summary = real_chexpert_plan.summary()
    assert summary["planned"] == summary["to_build"] == 191_027  # the paper's count
    assert summary["by_view"] == {"AP": 161_590, "PA": 29_420, "LL": 16, "RL": 1}
    assert summary["skipped"] == {"lateral": 32_387}
    assert summary["by_split"] == {"train": 191_027}
    assert summary["missing_files"] == 191_027  # metadata only, no images here
    assert any("valid.csv" in w for w in summary["warnings"])


def test_chexpert_real_labels_match_the_csv(real_chexpert_plan, real_chexpert_root) -> None:
    """Row by row: every frontal row's 14 cells against the record with its key."""
    records = real_chexpert_plan.records
    frame = pd.read_csv(real_chexpert_root / "train.csv.gz", dtype=str, keep_default_na=False)
    frontal = frame[frame["Frontal/Lateral"] == "Frontal"].copy()
    parts = frontal["Path"].str.extract(r"train/(patient\d+)/(study\d+)/(view\d+_\w+)\.jpg")
    frontal["key"] = "chexpert-train-" + parts[0] + "-" + parts[1] + "-" + parts[2]
    frontal = frontal.sort_values("key")
    assert frontal["key"].tolist() == [r.key for r in records]
    codes = {"1.0": 1, "0.0": 0, "-1.0": -1, "": None}
    for finding in FINDINGS:
        expected = [codes[cell] for cell in frontal[finding]]
        assert [r.labels[finding] for r in records] == expected, finding
    for finding in FINDINGS:  # native labels keep every non-empty raw cell
        has_cell = [f"{finding}={c}" for c in frontal[finding]]
        assert [n in r.native_labels for n, r in zip(has_cell, records)] == (
            frontal[finding] != ""
        ).tolist()
    sex = [r.sex for r in records]
    assert (
        sex.count("F")
        == (frontal["Sex"] == "Female").sum()
        == sum(1 for s in frontal["Sex"] if s == "Female")
    )
    assert sex.count(None) == (frontal["Sex"] == "Unknown").sum()


def test_chexpert_full_release_prefix_gives_the_same_keys(
    sample_roots: dict[str, Path], tmp_path: Path
) -> None:
    small = sample_roots["chexpert"]
    full = tmp_path / "CheXpert-v1.0"
    shutil.copytree(small, full)
    for name in ("train.csv", "valid.csv"):
        text = (full / name).read_text().replace("CheXpert-v1.0-small/", "CheXpert-v1.0/")
        (full / name).write_text(text)
    small_plan, full_plan = plan_source("chexpert", small), plan_source("chexpert", full)
    assert [r.key for r in small_plan.records] == [r.key for r in full_plan.records]
    assert all(r.path is not None for r in full_plan.records)


def test_chexpert_keeps_ll_frontal_rows_with_their_view(sample_roots_pristine) -> None:
    plan = plan_source("chexpert", sample_roots_pristine["chexpert"])
    views = {r.view for r in plan.records}
    assert "LL" in views and views <= {"AP", "PA", "LL", "RL"}
    assert plan.skipped["lateral"] > 0
    assert {r.split for r in plan.records} == {"train", "val"}


def test_chexpert_unknown_label_code_is_an_error(sample_roots: dict[str, Path]) -> None:
    root = sample_roots["chexpert"]
    lines = (root / "train.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[7] = "2.0"  # Cardiomegaly
    lines[1] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError) as caught:
        plan_source("chexpert", root)
    assert str(caught.value) == (
        f"{root / 'train.csv'}: column 'Cardiomegaly' has values ['2.0'] (row 2); "
        "expected one of ['', '-1', '-1.0', '0', '0.0', '1', '1.0']"
    )
    # Rows as the file numbers them (header = row 1), the first three of several.
    frontal = [i for i, line in enumerate(lines) if "frontal" in line.split(",")[0]][1:4]
    for i in frontal:
        cells = lines[i].split(",")
        cells[7] = "3"
        lines[i] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    rows = ", ".join(str(i + 1) for i in [1, *frontal[:2]])
    with pytest.raises(MetadataError, match=rf"has values \['2\.0', '3'\] \(rows {rows}, \.\.\.\)"):
        plan_source("chexpert", root)


def test_wrong_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="does not look like CheXpert"):
        plan_source("chexpert", tmp_path)
    with pytest.raises(MetadataError, match="is not a folder"):
        plan_source("nih", tmp_path / "nowhere")


def test_known_bad_files_are_counted_not_built(sample_roots_pristine, tmp_path, monkeypatch):
    """known_bad.csv (matched on the release-relative path) removes a file from the build."""
    from machex.tables import tables_root

    tables = tmp_path / "tables"
    shutil.copytree(tables_root(), tables)
    root = sample_roots_pristine["chestxray14"]
    victim = plan_source("nih", root).records[3]
    with (tables / "chestxray14" / "known_bad.csv").open("a") as handle:
        handle.write(f"{victim.source_key},unreadable in the release\n")
    monkeypatch.setenv("MACHEX_TABLES", str(tables))
    plan = plan_source("nih", root)
    assert plan.known_bad == [victim.source_key]
    assert victim.key not in {r.key for r in plan.records}
    summary = plan.summary()
    assert summary["planned"] == summary["to_build"] + 1 and summary["known_bad"] == 1


def test_rows_longer_than_the_header(sample_roots: dict[str, Path]) -> None:
    """A trailing comma on the data rows only must not shift the columns (pandas would take
    the first column as an index); a real extra field is an input error."""
    root = sample_roots["chexpert"]
    expected = plan_source("chexpert", root).records
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join([lines[0], *(x + "," for x in lines[1:])]) + "\n")
    assert plan_source("chexpert", root).records == expected
    lines[1] += ",surplus"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"more fields than the header \(row 2: "):
        plan_source("chexpert", root)


@pytest.mark.parametrize("cut", ["middle", "last"])
def test_rows_shorter_than_the_header(sample_roots: dict[str, Path], cut: str) -> None:
    """A row cut short is a truncated or corrupt download: pandas would pad it with empty
    cells (here an empty view, counted as unknown_view without a word)."""
    root = sample_roots["chestxray14"]
    path = root / "Data_Entry_2017_v2020.csv"
    lines = path.read_text().splitlines()
    victim = 5 if cut == "middle" else len(lines) - 1
    lines[victim] = ",".join(lines[victim].split(",")[:6])  # ends at Patient Gender
    path.write_text("\n".join(lines) + ("\n" if cut == "middle" else ""))
    message = rf"{path.name} row {victim + 1}: 6 fields, the header has 11; a truncated"
    with pytest.raises(MetadataError, match=message):
        plan_source("nih", root)


def test_a_header_with_trailing_empty_fields_needs_no_cells(tmp_path: Path) -> None:
    """``Bbox [x,y,w,h],,,``, or an older release's trailing comma on the header only: rows
    without those unnamed fields are not short."""
    path = tmp_path / "trailing.csv"
    path.write_text("a,b,c,,\n1,2,3\n4,5,6,,\n")
    frame = read_metadata_csv(path, ("a", "b", "c"))
    assert frame[["a", "b", "c"]].values.tolist() == [["1", "2", "3"], ["4", "5", "6"]]


def test_quoted_line_breaks_and_blank_lines_are_no_short_rows(tmp_path: Path) -> None:
    """A header cell with a quoted line break (pyarrow's fast count skips one line too few)
    and a whitespace-only line (pandas reads past it) are not truncated rows."""
    path = tmp_path / "quoted.csv"
    path.write_text('a,"b\nB",c\n1,"2\n2",3\n   \n4,5,6\n')
    frame = read_metadata_csv(path, ("a", "b\nB", "c"))
    assert frame["a"].tolist()[0] == "1" and frame["c"].tolist()[-1] == "6"


def test_chexpert_unmerged_batch_folders_are_found_by_path_tail(
    sample_roots: dict[str, Path],
) -> None:
    """AIMI's batch zips unpack into their own folders: files are found by patient/study/view."""
    root = sample_roots["chexpert"]
    batch = root / "CheXpert-v1.0 batch 2 (train 1)"
    batch.mkdir()
    (root / "train").rename(batch / "train")
    plan = plan_source("chexpert", root)
    assert plan.summary()["missing_files"] == 0
    assert all("batch 2" in r.path for r in plan.records if r.split == "train")


def test_a_folder_with_two_releases_is_ambiguous(sample_roots, tmp_path: Path) -> None:
    parent = sample_roots["chexpert"].parent
    shutil.copytree(sample_roots["chexpert"], parent / "CheXpert-v1.0")
    with pytest.raises(MetadataError, match="several copies"):
        plan_source("chexpert", parent)


# --- --views ---------------------------------------------------------------------------------


def test_view_selection_parsing() -> None:
    from machex.tables import ViewSelection

    assert ViewSelection.parse(None) == ViewSelection.parse("frontal") == ViewSelection()
    assert ViewSelection.parse("all").groups == {"frontal", "lateral"}
    assert ViewSelection.parse("+ap_horizontal").groups == {"frontal", "ap_horizontal"}
    assert ViewSelection.parse("lateral").groups == {"lateral"}
    assert ViewSelection.parse("Lateral, frontal").spec == "frontal,lateral"
    with pytest.raises(ValueError, match="view group"):
        ViewSelection.parse("front-al")


def test_views_open_the_laterals(sample_roots_pristine: dict[str, Path]) -> None:
    from machex.adapters.base import PlanOptions
    from machex.tables import ViewSelection

    root = sample_roots_pristine["chexpert"]
    frontal = plan_source("chexpert", root)
    lateral = plan_source("chexpert", root, PlanOptions(views=ViewSelection.parse("lateral")))
    both = plan_source("chexpert", root, PlanOptions(views=ViewSelection.parse("all")))
    assert frontal.records and lateral.records
    assert len(both.records) == len(frontal.records) + len(lateral.records)
    assert lateral.skipped == {"frontal": len(frontal.records)}
    assert frontal.skipped == {"lateral": len(lateral.records)}
    assert all("lateral" in r.source_key for r in lateral.records)
    assert {r.view for r in lateral.records} == {"LATERAL"}
    # VinDr-CXR has only PA images: a lateral-only selection takes none of them
    vindr = plan_source(
        "vindr", sample_roots_pristine["vindr"], PlanOptions(views=ViewSelection.parse("lateral"))
    )
    assert vindr.records == [] and vindr.skipped == {"frontal": 10}


@pytest.mark.parametrize("source", sorted(ADAPTERS))
def test_missing_and_undecodable_files_are_failures_not_crashes(
    source: str, sample_roots: dict[str, Path], tmp_path: Path
) -> None:
    from machex import load_manifest
    from machex.build import BuildOptions, build_source

    root = sample_roots[source]
    plan = plan_source(source, root)
    missing, garbage = plan.records[0], plan.records[1]
    Path(missing.path).unlink()
    Path(garbage.path).write_bytes(b"this is not an image of any kind")
    out = tmp_path / "out"
    result = build_source(source, root, out, BuildOptions(workers=1, max_failure_rate=1))
    assert (result.built, result.failed) == (len(plan.records) - 2, 2)
    failures = load_manifest(out, "failures").set_index("key")
    assert failures.loc[missing.key, "error_type"] == "FileNotFoundError"
    assert failures.loc[missing.key, "source_key"] == missing.source_key
    assert failures.loc[garbage.key, "error_type"] == "ImageDecodeError"
    assert failures.loc[garbage.key, "path"] == garbage.path


def test_a_new_adapters_mistakes_are_named_at_import() -> None:
    """A missing title failed only in `machex sources` (AttributeError); a capitalised name
    could not be chosen, a dotted one made keys that do not start with it."""
    from machex.adapters import _check
    from machex.adapters.base import SourceAdapter

    def adapter(name: str, **attributes: object) -> SourceAdapter:
        fields = {"name": name, "homepage": "h", "licence": "l", "citation": "c"}
        fields |= {"metadata_files": ("metadata.csv",), "plan": lambda self, *a, **k: None}
        return type("Toy", (SourceAdapter,), fields | attributes)()

    with pytest.raises(ImportError, match="toy: the adapter sets no title"):
        _check(adapter("toycxr"), "toy")
    for bad in ("ToyCXR", "toy.cxr", "7cxr"):
        with pytest.raises(ImportError, match=f"adapter name {bad!r}: lowercase letters"):
            _check(adapter(bad, title="Toy"), "toy")
    _check(adapter("toycxr", title="Toy"), "toy")
    for name, registered in ADAPTERS.items():
        _check(registered, name)


def test_two_miniatures_in_one_folder_are_named(tmp_path: Path, monkeypatch) -> None:
    """A new source's miniature written to PadChest/ mixed the two sources' files; the tests
    then failed on a bare FileExistsError."""
    import machex.sample as sample

    def toy(dest: Path, rng) -> Path:
        root = dest / "PadChest" / "toy"
        root.mkdir(parents=True)
        return root

    monkeypatch.setitem(sample.SAMPLE_MAKERS, "toycxr", toy)
    with pytest.raises(ValueError, match="the miniatures of padchest and toycxr both write"):
        sample.make_sample(tmp_path, ["padchest", "toycxr"])
