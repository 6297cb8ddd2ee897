"""MIMIC-CXR: the adapter on the miniature JPG release and its DICOM twin (the real metadata and
reports are credentialed, so both follow the documented format): views, splits, labels, the
reports and where they are read from, the two releases and --prefer, malformed metadata,
failures in the build, and the CLI's dry run."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex.adapters import MetadataError, get_adapter
from machex.adapters.base import PlanOptions, make_key
from machex.build import BuildOptions, build_source, plan_source
from machex.manifests import load_manifest
from machex.records import FINDINGS, ReportChoice
from machex.reports import mimic_report
from machex.sample.mimic import LABEL_COLUMNS, REPORTS, make_mimic, write_zip
from machex.tables import ViewSelection, load_source_tables

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
NEGBIO = "mimic-cxr-2.0.0-negbio.csv.gz"
RECORD_LIST = "cxr-record-list.csv.gz"
CODES = {"1.0": 1, "0.0": 0, "-1.0": -1, "": None}
SPLITS = {"train": "train", "validate": "val", "test": "test"}


def read_csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def write_csv(frame: pd.DataFrame, root: Path, name: str) -> None:
    text = frame.to_csv(index=False, lineterminator="\n").encode()
    (root / name).write_bytes(gzip.compress(text, mtime=0) if name.endswith(".gz") else text)


def key_of(row: pd.Series) -> str:
    return make_key("mimic", f"p{row['subject_id']}", f"s{row['study_id']}", row["dicom_id"])


def report_files(root: Path) -> dict[str, Path]:
    """``{study_id: path}`` of the reports beside the study folders."""
    return {p.stem[1:]: p for p in sorted((root / "files").glob("p*/p*/s*.txt"))}


def move_reports_to_zip(root: Path, zip_path: Path, top: str) -> None:
    """The reports as the official zip holds them (``<top>files/pNN/...``), gone from the tree."""
    members = {}
    for path in report_files(root).values():
        members[top + str(path.relative_to(root))] = path.read_text()
        path.unlink()
    write_zip(zip_path, members)


@pytest.fixture
def mimic_copy(sample_roots_pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the MIMIC-CXR-JPG miniature only."""
    return Path(shutil.copytree(sample_roots_pristine["mimic"], tmp_path / "mimic"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The JPG release and its DICOM twin (same ids), the DICOM one with the JPG metadata and
    split copied in as the adapter requires."""
    top = tmp_path_factory.mktemp("releases")
    jpg = make_mimic(top, np.random.default_rng(3))
    dicom = make_mimic(top, np.random.default_rng(3), release="dicom")
    for name in (METADATA, SPLIT, CHEXPERT):
        shutil.copy(jpg / name, dicom / name)
    return jpg, dicom


@pytest.fixture(scope="module")
def built(sample_roots_pristine: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mimic-out")
    options = BuildOptions(workers=1, views=ViewSelection.parse("all"))
    return build_source("mimic", sample_roots_pristine["mimic"], out, options), out


def shard_json(out: Path) -> dict[str, dict]:
    """Every sample's JSON member, by key."""
    samples = {}
    for shard in sorted(load_manifest(out, "images")["shard"].unique()):
        with tarfile.open(out / shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    samples[member.name[: -len(".json")]] = json.loads(
                        tar.extractfile(member).read()
                    )
    return samples


# --- the miniature ------------------------------------------------------------------------


def test_sample_counts_by_split_and_view(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["mimic"]
    metadata, split = read_csv(root, METADATA), read_csv(root, SPLIT)
    views = metadata["ViewPosition"].value_counts().to_dict()
    assert {"PA", "AP", "LATERAL", "LL", ""} <= set(views), "the miniature must cover these"
    assert set(split["split"]) == {"train", "validate", "test"}
    plan = plan_source("mimic", root)
    summary = plan.summary()
    assert summary["by_view"] == {"AP": views["AP"], "PA": views["PA"]}
    assert summary["skipped"] == {
        "lateral": views["LATERAL"] + views["LL"],
        "blank_view": views[""],
        "axial": views["AP AXIAL"],
    }
    frontal = metadata[metadata["ViewPosition"].isin(["AP", "PA"])]
    split_of = dict(zip(split["dicom_id"], split["split"].map(SPLITS)))
    expected = frontal["dicom_id"].map(split_of).value_counts().to_dict()
    assert summary["by_split"] == dict(sorted(expected.items()))
    assert set(expected) == {"train", "val", "test"}
    assert summary["missing_files"] == 0
    studies = set(zip(frontal["subject_id"], frontal["study_id"]))
    with_report = {s for _, s in studies} & set(report_files(root))
    assert len(with_report) < len(studies), "the miniature has a study without a report"
    assert summary["studies"] == len(studies)
    assert summary["reports"] == {"en": len(with_report)}
    for record in plan.records:
        row = metadata[metadata["dicom_id"] == record.source_key.rsplit("/", 1)[1][:-4]].iloc[0]
        assert record.key == key_of(row)
        assert record.source_key == (
            f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}/"
            f"{row['dicom_id']}.jpg"
        )
        assert (record.patient_id, record.study_id) == (row["subject_id"], row["study_id"])
        assert record.view == row["ViewPosition"]
        assert record.split == split_of[row["dicom_id"]]
        assert record.extras == {}
        assert record.sex is None and record.age is None


def test_views_all_takes_the_laterals(sample_roots_pristine: dict[str, Path]) -> None:
    plan = plan_source(
        "mimic", sample_roots_pristine["mimic"], PlanOptions(views=ViewSelection.parse("all"))
    )
    assert set(plan.summary()["by_view"]) == {"AP", "PA", "LATERAL", "LL"}
    assert plan.skipped == {"blank_view": 1, "axial": 1}


def test_the_view_table_keeps_exactly_ap_and_pa() -> None:
    """The paper's 243,334 images are ViewPosition AP or PA over every split (SOURCES.md 0)."""
    views = load_source_tables("mimic").views
    assert {value for value, (keep, _) in views.items() if keep} == {"AP", "PA"}
    assert views["LATERAL"] == views["LL"] == (False, "lateral")
    assert views[""] == (False, "blank_view")
    table1 = pd.read_csv(Path(__file__).parents[1] / "manifests/papers/paper-2023-table1.csv")
    assert table1.set_index("source").loc["mimic", "in_machex"] == 243334


def test_sample_labels_match_the_csv(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["mimic"]
    labels = read_csv(root, CHEXPERT).set_index(["subject_id", "study_id"])
    assert {"", "1.0", "0.0", "-1.0"} <= set(labels.to_numpy().ravel())
    records = plan_source("mimic", root).records
    unlabelled = [r for r in records if (r.patient_id, r.study_id) not in labels.index]
    assert unlabelled, "the miniature has a study without a label row"
    for record in records:
        if (record.patient_id, record.study_id) in labels.index:
            row = labels.loc[(record.patient_id, record.study_id)]
            assert record.labels == {f: CODES[row[f]] for f in FINDINGS}
            assert record.native_labels == tuple(f"{c}={row[c]}" for c in LABEL_COLUMNS if row[c])
        else:
            assert record.labels == dict.fromkeys(FINDINGS) and record.native_labels == ()


def test_negbio_is_read_when_chexpert_is_absent(mimic_copy: Path) -> None:
    (mimic_copy / CHEXPERT).unlink()
    plan = plan_source("mimic", mimic_copy)
    negbio = read_csv(mimic_copy, NEGBIO).set_index(["subject_id", "study_id"])
    assert f"labels: {NEGBIO} (mimic-cxr-2.0.0-chexpert.csv not found)" in plan.warnings
    for record in plan.records:
        if (record.patient_id, record.study_id) in negbio.index:
            row = negbio.loc[(record.patient_id, record.study_id)]
            assert record.labels == {f: CODES[row[f]] for f in FINDINGS}
    (mimic_copy / NEGBIO).unlink()
    plan = plan_source("mimic", mimic_copy)
    assert all(set(r.labels.values()) == {None} for r in plan.records)
    assert any("every label is null" in w for w in plan.warnings)


def test_plain_csvs_are_accepted(mimic_copy: Path) -> None:
    expected = plan_source("mimic", mimic_copy).records
    for path in mimic_copy.glob("*.csv.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert plan_source("mimic", mimic_copy).records == expected
    assert plan_source("mimic", mimic_copy.parent).root == mimic_copy.resolve()


def test_sample_is_byte_identical_for_one_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    for release in ("jpg", "dicom"):
        a = make_mimic(tmp_path / f"a-{release}", np.random.default_rng(5), release=release)
        b = make_mimic(tmp_path / f"b-{release}", np.random.default_rng(5), release=release)
        assert digest(a) == digest(b)


# --- reports ------------------------------------------------------------------------------


def test_reports_beside_the_studies(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["mimic"]
    files = report_files(root)
    records = plan_source("mimic", root).records
    by_study: dict[str, object] = {}
    for record in records:
        if record.study_id not in files:
            assert record.report is None
            continue
        report = record.report
        assert report is not None and report.study_id == record.study_id
        assert report == mimic_report(record.study_id, files[record.study_id].read_text())
        assert report.language == "en"
        # One object per study, shared by its images.
        assert by_study.setdefault(record.study_id, report) is report
    texts = {r.report.text for r in records if r.report}
    assert texts <= set(REPORTS.values())
    found = {r.report.text: r.report for r in records if r.report}
    assert found[REPORTS["impression_only"]].findings is None
    assert found[REPORTS["addendum"]].impression == "Right lower lobe pneumonia."
    assert "discussed" not in found[REPORTS["addendum"]].findings_impression
    assert found[REPORTS["variants"]].impression == (
        "Mild cardiomegaly without acute cardiopulmonary abnormality."
    )


@pytest.mark.parametrize("top", ["", "mimic-cxr-reports/", "physionet.org/files/mimic-cxr/2.0.0/"])
def test_reports_from_a_zip(mimic_copy: Path, tmp_path: Path, top: str) -> None:
    expected = plan_source("mimic", mimic_copy).records
    zipped = tmp_path / "mimic-cxr-reports.zip"
    move_reports_to_zip(mimic_copy, zipped, top)
    without = plan_source("mimic", mimic_copy)
    assert all(r.report is None for r in without.records)
    assert any(w.startswith("no report found") for w in without.warnings)
    assert plan_source("mimic", mimic_copy, PlanOptions(reports=zipped)).records == expected


@pytest.mark.parametrize("given", ["outer", "files", "groups"])
def test_reports_from_a_folder(mimic_copy: Path, tmp_path: Path, given: str) -> None:
    expected = plan_source("mimic", mimic_copy).records
    outer = tmp_path / "download"
    unpacked = outer / "mimic-cxr-reports"
    move_reports_to_zip(mimic_copy, tmp_path / "r.zip", "mimic-cxr-reports/")
    with zipfile.ZipFile(tmp_path / "r.zip") as archive:
        archive.extractall(outer)
    folder = {"outer": outer, "files": unpacked, "groups": unpacked / "files"}[given]
    assert plan_source("mimic", mimic_copy, PlanOptions(reports=folder)).records == expected
    if given == "outer":  # a second tree beside it: which one is meant is not guessed
        shutil.copytree(unpacked, outer / "copy")
        with pytest.raises(MetadataError, match="several report trees"):
            plan_source("mimic", mimic_copy, PlanOptions(reports=folder))


def test_given_reports_replace_the_tree(mimic_copy: Path, tmp_path: Path) -> None:
    """--reports is the only place read: a study missing there has none, even beside it."""
    some = tmp_path / "some"
    study, path = next(iter(report_files(mimic_copy).items()))
    target = some / "files" / path.relative_to(mimic_copy / "files")
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    plan = plan_source("mimic", mimic_copy, PlanOptions(reports=some))
    assert {r.study_id for r in plan.records if r.report} == {study}


def test_bad_reports_locations_are_named(mimic_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="--reports .*nowhere does not exist"):
        plan_source("mimic", mimic_copy, PlanOptions(reports=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetadataError, match="no p10..p19 folders"):
        plan_source("mimic", mimic_copy, PlanOptions(reports=tmp_path / "empty"))
    write_zip(tmp_path / "other.zip", {"readme.txt": "not reports"})
    with pytest.raises(MetadataError, match=r"no files/pNN/p<subject>/s<study>\.txt members"):
        plan_source("mimic", mimic_copy, PlanOptions(reports=tmp_path / "other.zip"))
    (tmp_path / "not.zip").write_text("plain text")
    with pytest.raises(MetadataError, match="cannot read as a zip"):
        plan_source("mimic", mimic_copy, PlanOptions(reports=tmp_path / "not.zip"))


def test_an_empty_report_file_is_no_report(mimic_copy: Path) -> None:
    study, path = next(iter(report_files(mimic_copy).items()))
    path.write_text(" \n")
    plan = plan_source("mimic", mimic_copy)
    assert all(r.report is None for r in plan.records if r.study_id == study)


def test_build_writes_one_report_row_per_study(built) -> None:
    result, out = built
    assert result.failed == 0 and result.built == result.to_build
    images = load_manifest(out, "images")
    reports = load_manifest(out, "reports")
    assert reports["study_id"].is_unique
    studies_with_report = {s for s in images["study_id"] if s in set(reports["study_id"])}
    assert len(reports) == len(studies_with_report) == 5
    assert images.groupby("study_id").size().max() > 1, "several images share a study"
    samples = shard_json(out)
    for row in reports.to_dict("records"):
        expected = asdict(mimic_report(row["study_id"], row["text"]))
        assert {k: None if pd.isna(row[k]) else row[k] for k in expected} == expected
    for sample in samples.values():
        sections = sample["report_sections"]
        if sections is None:
            assert sample["report"] is None
            continue
        assert sections["study_id"] == sample["study_id"]
        assert sample["report"] == sections["text_v1"]  # the default --report-text
        row = reports.set_index("study_id").loc[sample["study_id"]]
        assert sections["findings_impression"] == row["findings_impression"]


def test_report_text_choice_changes_the_json(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    choice = ReportChoice("findings_impression")
    build_source(
        "mimic", sample_roots_pristine["mimic"], tmp_path, BuildOptions(workers=1, report=choice)
    )
    samples = shard_json(tmp_path)
    with_report = [s for s in samples.values() if s["report_sections"]]
    assert with_report
    for sample in with_report:
        assert sample["report"] == sample["report_sections"]["findings_impression"]
    assert any(s["report"] != s["report_sections"]["text_v1"] for s in with_report)


# --- the DICOM release --------------------------------------------------------------------


def test_dicom_release_needs_the_jpg_metadata(tmp_path: Path) -> None:
    dicom = make_mimic(tmp_path, np.random.default_rng(3), release="dicom")
    with pytest.raises(MetadataError, match=rf"no view and no split; copy {METADATA} and {SPLIT}"):
        plan_source("mimic", dicom)


def test_dicom_release_plans_the_same_images(releases: tuple[Path, Path]) -> None:
    jpg, dicom = releases
    jpg_plan, dicom_plan = plan_source("mimic", jpg), plan_source("mimic", dicom)
    assert [r.key for r in dicom_plan.records] == [r.key for r in jpg_plan.records]
    assert dicom_plan.summary()["by_split"] == jpg_plan.summary()["by_split"]
    assert any(w.startswith("images: DICOM") for w in dicom_plan.warnings)
    records = read_csv(dicom, RECORD_LIST).set_index("dicom_id")
    for record in dicom_plan.records:
        assert record.source_key == records.loc[record.source_key.rsplit("/", 1)[1][:-4], "path"]
        assert record.path.endswith((".dcm", ".dcm.gz")) and Path(record.path).is_file()
    assert sum(r.path.endswith(".dcm.gz") for r in dicom_plan.records) == 1
    # Reports come from mimic-cxr-reports.zip at the root.
    assert [r.report for r in dicom_plan.records] == [r.report for r in jpg_plan.records]
    assert dicom_plan.missing_files == 0


def test_record_list_rows_without_metadata_are_skipped(releases, tmp_path: Path) -> None:
    dicom = Path(shutil.copytree(releases[1], tmp_path / "dicom"))
    metadata = read_csv(dicom, METADATA)
    dropped = metadata[metadata["ViewPosition"] == "PA"].iloc[0]
    write_csv(metadata.drop(index=dropped.name), dicom, METADATA)
    plan = plan_source("mimic", dicom)
    assert plan.skipped["not_in_metadata_csv"] == 1
    assert key_of(dropped) not in {r.key for r in plan.records}


def test_prefer_picks_the_format_where_both_are_present(releases, tmp_path: Path) -> None:
    jpg, dicom = releases
    both = Path(shutil.copytree(jpg, tmp_path / "both"))
    shutil.copytree(dicom / "files", both / "files", dirs_exist_ok=True)
    shutil.copy(dicom / RECORD_LIST, both / RECORD_LIST)
    default = plan_source("mimic", both)
    assert all(r.path.endswith(".jpg") for r in default.records)
    assert not any(w.startswith("images: DICOM") for w in default.warnings)
    chosen = plan_source("mimic", both, PlanOptions(prefer="dicom"))
    assert all(".dcm" in r.path for r in chosen.records)
    assert [r.key for r in chosen.records] == [r.key for r in default.records]
    # Without the record list, the DICOM paths follow the same pattern as the JPEGs.
    (both / RECORD_LIST).unlink()
    derived = plan_source("mimic", both, PlanOptions(prefer="dicom"))
    assert [r.path for r in derived.records] == [r.path for r in chosen.records]
    assert plan_source("mimic", dicom, PlanOptions(prefer="jpg")).missing_files == len(
        default.records
    )
    with pytest.raises(MetadataError, match=r"--prefer png: MIMIC-CXR .* \['jpg', 'dicom'\]"):
        plan_source("mimic", both, PlanOptions(prefer="png"))


def test_dicom_release_builds(releases, tmp_path: Path) -> None:
    jpg, dicom = releases
    result = build_source("mimic", dicom, tmp_path / "out", BuildOptions(workers=1))
    assert (result.built, result.failed) == (len(plan_source("mimic", jpg).records), 0)
    images = load_manifest(tmp_path / "out", "images")
    assert set(images["bits"]) == {12}
    assert len(load_manifest(tmp_path / "out", "reports")) == 5


# --- malformed metadata -------------------------------------------------------------------


def test_an_unknown_split_value_names_file_row_and_value(mimic_copy: Path) -> None:
    split = read_csv(mimic_copy, SPLIT)
    split.loc[3, "split"] = "training"
    write_csv(split, mimic_copy, SPLIT)
    with pytest.raises(MetadataError, match=rf"{SPLIT} row 5: split 'training'; expected"):
        plan_source("mimic", mimic_copy)


def test_one_image_in_two_splits_is_an_error(mimic_copy: Path) -> None:
    split = read_csv(mimic_copy, SPLIT)
    twin = split.iloc[[0]].assign(split="test" if split.loc[0, "split"] != "test" else "train")
    write_csv(pd.concat([split, twin], ignore_index=True), mimic_copy, SPLIT)
    with pytest.raises(MetadataError, match=rf"{SPLIT} row {len(split) + 2}: dicom_id"):
        plan_source("mimic", mimic_copy)


def test_images_missing_from_the_split_are_skipped(mimic_copy: Path) -> None:
    split = read_csv(mimic_copy, SPLIT)
    metadata = read_csv(mimic_copy, METADATA)
    frontal = metadata[metadata["ViewPosition"] == "AP"].iloc[0]
    write_csv(split[split["dicom_id"] != frontal["dicom_id"]], mimic_copy, SPLIT)
    plan = plan_source("mimic", mimic_copy)
    assert plan.skipped["not_in_split_csv"] == 1
    assert key_of(frontal) not in {r.key for r in plan.records}


@pytest.mark.parametrize(
    ("name", "column", "value", "message"),
    [
        (METADATA, "subject_id", "p10000032", r"row 2: subject_id 'p10000032' is not a number"),
        (METADATA, "dicom_id", "a/b", r"row 2: dicom_id 'a/b' is not an id"),
        (CHEXPERT, "study_id", "", r"row 2: study_id '' is not a number"),
        (CHEXPERT, "Edema", "2.0", r"column 'Edema' has values \['2\.0'\]"),
    ],
)
def test_malformed_cells_are_named(
    mimic_copy: Path, name: str, column: str, value: str, message: str
) -> None:
    frame = read_csv(mimic_copy, name)
    frame.loc[0, column] = value
    write_csv(frame, mimic_copy, name)
    with pytest.raises(MetadataError, match=rf"{name}.*{message}"):
        plan_source("mimic", mimic_copy)


def test_float_looking_ids_are_read_as_numbers(mimic_copy: Path) -> None:
    expected = plan_source("mimic", mimic_copy).records
    for name in (METADATA, CHEXPERT):
        frame = read_csv(mimic_copy, name)
        frame["study_id"] = frame["study_id"] + ".0"
        write_csv(frame, mimic_copy, name)
    assert plan_source("mimic", mimic_copy).records == expected


def test_conflicting_label_rows_are_an_error(mimic_copy: Path) -> None:
    labels = read_csv(mimic_copy, CHEXPERT)
    write_csv(pd.concat([labels, labels.iloc[[0]]], ignore_index=True), mimic_copy, CHEXPERT)
    assert plan_source("mimic", mimic_copy).records  # an exact repeat is harmless
    twin = labels.iloc[[0]].assign(Fracture="1.0" if labels.loc[0, "Fracture"] != "1.0" else "")
    write_csv(pd.concat([labels, twin], ignore_index=True), mimic_copy, CHEXPERT)
    with pytest.raises(MetadataError, match=rf"{CHEXPERT} rows 2 and {len(labels) + 2}: study"):
        plan_source("mimic", mimic_copy)


@pytest.mark.parametrize(("name", "column"), [(METADATA, "ViewPosition"), (SPLIT, "split")])
def test_missing_columns_are_named(mimic_copy: Path, name: str, column: str) -> None:
    write_csv(read_csv(mimic_copy, name).drop(columns=[column]), mimic_copy, name)
    with pytest.raises(MetadataError, match=rf"{name}: .*'{column}'"):
        plan_source("mimic", mimic_copy)


def test_no_split_file_is_named(mimic_copy: Path) -> None:
    (mimic_copy / SPLIT).unlink()
    with pytest.raises(MetadataError, match="mimic-cxr-2.0.0-split.csv"):
        plan_source("mimic", mimic_copy)


def test_no_metadata_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="mimic-cxr-2.0.0-metadata.csv"):
        plan_source("mimic", tmp_path)


# --- failures in the build ----------------------------------------------------------------


def test_missing_and_undecodable_files_become_failures(mimic_copy: Path, tmp_path: Path) -> None:
    plan = plan_source("mimic", mimic_copy)
    missing, garbage = plan.records[0], plan.records[1]
    Path(missing.path).unlink()
    Path(garbage.path).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    assert plan_source("mimic", mimic_copy).missing_files == 1
    out = tmp_path / "out"
    result = build_source("mimic", mimic_copy, out, BuildOptions(workers=1, max_failure_rate=1))
    assert (result.built, result.failed) == (len(plan.records) - 2, 2)
    failures = load_manifest(out, "failures").set_index("key")
    assert failures.loc[missing.key, "error_type"] == "FileNotFoundError"
    assert failures.loc[missing.key, "source_key"] == missing.source_key
    assert failures.loc[garbage.key, "error_type"] != "FileNotFoundError"
    assert failures.loc[garbage.key, "path"] == garbage.path
    # A study's report is written whether or not its images decoded.
    reports = load_manifest(out, "reports")
    assert set(reports["study_id"]) == {r.study_id for r in plan.records if r.report}


# --- CLI ----------------------------------------------------------------------------------


def test_cli_dry_run_with_reports_zip(mimic_copy: Path, tmp_path: Path) -> None:
    zipped = tmp_path / "mimic-cxr-reports.zip"
    move_reports_to_zip(mimic_copy, zipped, "")
    args = ["build", "--source", "mimic-cxr", "--root", str(mimic_copy), "--dry-run", "--json"]
    result = CliRunner().invoke(app, [*args, "--reports", str(zipped)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["sources"]["mimic"]
    assert summary["to_build"] == 6
    assert (summary["studies"], summary["reports"]) == (6, {"en": 5})
    result = CliRunner().invoke(app, [*args, "--reports", str(tmp_path / "none.zip")])
    assert result.exit_code == 2 and "--reports" in result.output


def test_aliases() -> None:
    assert get_adapter("MIMIC-CXR").name == get_adapter("mimic-cxr-jpg").name == "mimic"
