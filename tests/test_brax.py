"""BRAX: the adapter on the miniature and on hand-written spreadsheets (the real metadata is
credentialed, so there is no real copy in ../shared): views, labels, age bins, the PngPath
rules, --prefer dicom, malformed rows, failures in the build, and the CLI's dry run."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex.adapters import MetadataError
from machex.adapters.base import PlanOptions, make_key
from machex.adapters.brax import parse_age_bin
from machex.build import BuildOptions, build_source, plan_source
from machex.manifests import load_manifest
from machex.records import FINDINGS
from machex.sample.brax import BRAX_FINDINGS, BRAX_HEADER, JUNK, make_brax

CSV = "master_spreadsheet_update.csv"
CODES = {"1.0": 1, "0.0": 0, "-1.0": -1, "1": 1, "0": 0, "-1": -1, "": None}
STEM = re.compile(r"(image-[^/]+?)\.(?:png|dcm)")


def read_csv(root: Path, name: str = CSV) -> pd.DataFrame:
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def expected_key(path: str) -> str:
    match = STEM.search(path)
    assert match is not None, path
    return make_key("brax", match.group(1))


@pytest.fixture
def brax_copy(sample_roots_pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the BRAX miniature only (the other sources are not copied)."""
    return Path(shutil.copytree(sample_roots_pristine["brax"], tmp_path / "brax"))


def write_fixture(root: Path, rows: list[dict[str, str]], name: str = CSV) -> Path:
    """A spreadsheet with BRAX's header; unspecified cells get plausible defaults."""
    header = BRAX_HEADER.split(",")
    lines = [BRAX_HEADER]
    for n, row in enumerate(rows):
        cells = {
            "DicomPath": f"Anonymized_DICOMs/id_1/Study_1/Series_1/image-{n}.dcm",
            "PngPath": f"images/id_1/Study_1/Series_1/image-{n}.png",
            "PatientID": "1",
            "PatientSex": "F",
            "PatientAge": "40",
            "AccessionNumber": "900",
            "StudyDate": "2100-01-01",
            "ViewPosition": "PA",
            "Rows": "360",
            "Columns": "300",
            "Manufacturer": "1",
        } | row
        lines.append(",".join(cells.get(column, "") for column in header))
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def touch(root: Path, relative: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read when planning")
    return path


# --- the miniature ------------------------------------------------------------------------


def test_sample_view_filter_counts(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["brax"]
    frame = read_csv(root)
    views = frame["ViewPosition"].value_counts().to_dict()
    assert {"PA", "AP", "L", ""} <= set(views), "the miniature must cover these views"
    summary = plan_source("brax", root).summary()
    assert summary["by_view"] == {"AP": views["AP"], "PA": views["PA"]}
    assert summary["planned"] == summary["to_build"] == views["AP"] + views["PA"]
    assert summary["skipped"] == {
        "lateral": views["L"],
        "blank_view": views[""],
        "decubitus": views["AP LLD"],
    }
    assert summary["by_split"] == {"train": summary["to_build"]}  # no official split
    assert summary["missing_files"] == 0


def test_sample_labels_match_the_csv_cells(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["brax"]
    frame = read_csv(root)
    cells = set(frame[list(BRAX_FINDINGS)].to_numpy().ravel())
    assert {"", "1.0", "0.0", "-1.0", "-1", "1"} <= cells, "several codes and spellings"
    kept = frame[frame["ViewPosition"].isin(["AP", "PA"])]
    records = {r.key: r for r in plan_source("brax", root).records}
    assert sorted(records) == sorted(expected_key(p) for p in kept["PngPath"])
    for _, row in kept.iterrows():
        record = records[expected_key(row["PngPath"])]
        assert record.labels == {f: CODES[row[f]] for f in FINDINGS}
        assert record.native_labels == tuple(f"{f}={row[f]}" for f in BRAX_FINDINGS if row[f])
        assert record.source_key == row["PngPath"]  # as the metadata gives it, junk included
        assert record.patient_id == row["PatientID"]
        assert record.study_id == row["AccessionNumber"]
        assert record.view == row["ViewPosition"]
        assert record.sex == (row["PatientSex"] or None)
        assert record.extras.get("age_bin") == (row["PatientAge"] or None)
        assert record.extras["csv_rows"] == int(row["Rows"])
        # Small extras, and never the fictitious StudyDate.
        assert set(record.extras) == {"age_bin", "csv_rows", "csv_columns", "manufacturer"} - (
            set() if row["PatientAge"] else {"age_bin"}
        )


def test_sample_age_bins(sample_roots_pristine: dict[str, Path]) -> None:
    records = plan_source("brax", sample_roots_pristine["brax"]).records
    oldest = [r for r in records if r.extras.get("age_bin") == "85 or more"]
    assert oldest and all(r.age == 85 for r in oldest)
    assert {r.sex for r in records} >= {"M", "F", "O"}


def test_sample_exercises_every_path_rule(sample_roots_pristine: dict[str, Path]) -> None:
    root = sample_roots_pristine["brax"]
    frame = read_csv(root)
    assert frame["PngPath"].str.endswith(JUNK).sum() == 1
    assert frame["DicomPath"].str.endswith(JUNK).sum() == 1
    for prefer in (None, "dicom"):
        plan = plan_source("brax", root, PlanOptions(prefer=prefer))
        rules = plan.path_rules
        assert rules["minus_7_chars"] == rules["by_name"] == 1 and rules["missing"] == 0
        assert sum(rules.values()) == len(plan.records)


def test_sample_is_byte_identical_for_one_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    a = make_brax(tmp_path / "a", np.random.default_rng(7))
    b = make_brax(tmp_path / "b", np.random.default_rng(7))
    assert digest(a) == digest(b)
    assert any(name.endswith(".dcm") for name in digest(a))


# --- hand-written spreadsheets ------------------------------------------------------------


def test_unknown_and_blank_views_are_skipped_and_counted(tmp_path: Path) -> None:
    views = ["PA", "AP", "L", "RL", "AP LLD", "LT-DECUB", "RLO", "", "XYZ", "pa", " AP "]
    root = write_fixture(tmp_path / "brax", [{"ViewPosition": v} for v in views])
    plan = plan_source("brax", root)
    assert plan.summary()["by_view"] == {"AP": 2, "PA": 1}
    assert plan.skipped == {
        "lateral": 2,
        "decubitus": 2,
        "oblique": 1,
        "blank_view": 1,
        "unknown_view": 2,  # XYZ, and pa: values are case-sensitive
    }


def test_age_bins_parse_to_the_bin_start(tmp_path: Path) -> None:
    ages = ["0", "5", "80", "85 or more", "", "unknown", "45.0"]
    root = write_fixture(tmp_path / "brax", [{"PatientAge": a} for a in ages])
    by_bin = {r.key: r for r in plan_source("brax", root).records}
    got = [by_bin[make_key("brax", f"image-{n}")].age for n in range(len(ages))]
    assert got == [0, 5, 80, 85, None, None, 45]
    bins = [by_bin[make_key("brax", f"image-{n}")].extras.get("age_bin") for n in range(7)]
    assert bins == ["0", "5", "80", "85 or more", None, "unknown", "45.0"]
    assert parse_age_bin(" 85 OR MORE ") == 85 and parse_age_bin("90+") is None


def test_path_rules_are_counted_and_logged(tmp_path: Path, caplog) -> None:
    series = "images/id_1/Study_1/Series_1"
    rows = [
        {"PngPath": f"{series}/image-0.png"},  # as given
        {"PngPath": f"{series}/image-1.png{JUNK}"},  # 7 junk characters
        {"PngPath": f"{series}/image-2.png"},  # elsewhere below images/
        {"PngPath": f"{series}/image-3.png"},  # nowhere
        {"PngPath": f"{series}/image-4.png", "ViewPosition": "L"},  # skipped: not counted
    ]
    root = write_fixture(tmp_path / "brax", rows)
    as_given = touch(root, f"{series}/image-0.png")
    trimmed = touch(root, f"{series}/image-1.png")
    moved = touch(root, "images/unsorted/image-2.png")
    touch(root, "Anonymized_DICOMs/elsewhere/image-3.dcm")  # another format: not a match
    with caplog.at_level(logging.INFO, logger="machex.adapters.brax"):
        plan = plan_source("brax", root)
    assert plan.path_rules == {"as_given": 1, "minus_7_chars": 1, "by_name": 1, "missing": 1}
    assert plan.summary()["path_rules"] == plan.path_rules
    paths = {r.key: r.path for r in plan.records}
    assert paths == {
        "brax-image-0": str(as_given),
        "brax-image-1": str(trimmed),
        "brax-image-2": str(moved),
        "brax-image-3": None,
    }
    source_keys = {r.key: r.source_key for r in plan.records}
    assert source_keys["brax-image-1"] == f"{series}/image-1.png{JUNK}"
    assert plan.missing_files == 1
    assert "as_given 1, minus_7_chars 1, by_name 1, missing 1" in caplog.text


def test_a_cut_that_leaves_no_image_name_is_not_taken(tmp_path: Path) -> None:
    """Rule 2 only accepts a cut that ends in the format's suffix, never a truncated name."""
    root = write_fixture(tmp_path / "brax", [{"PngPath": "images/a/image-1234567.png"}])
    touch(root, "images/a/image-")  # what PngPath[:-7] would point at
    plan = plan_source("brax", root)
    assert plan.path_rules["missing"] == 1 and plan.records[0].path is None


def test_rows_without_patient_or_path_are_skipped(tmp_path: Path) -> None:
    rows = [
        {},
        {"PatientID": ""},
        {"PatientID": " "},
        {"PngPath": ""},
        {"PngPath": "", "PatientID": ""},  # counted once, as the first reason
        {"PngPath": "", "ViewPosition": "L"},  # the view rule comes first
    ]
    root = write_fixture(tmp_path / "brax", rows)
    plan = plan_source("brax", root)
    assert len(plan.records) == 1
    assert plan.skipped == {"missing_patient_id": 3, "missing_png_path": 1, "lateral": 1}
    # Reading the DICOMs, an empty PngPath does not matter; an empty DicomPath does.
    dicom = plan_source("brax", root, PlanOptions(prefer="dicom"))
    assert len(dicom.records) == 2
    assert dicom.skipped == {"missing_patient_id": 3, "lateral": 1}


def test_master_spreadsheet_and_gzip_are_accepted(brax_copy: Path) -> None:
    expected = plan_source("brax", brax_copy).records
    text = (brax_copy / CSV).read_bytes()
    (brax_copy / CSV).unlink()
    (brax_copy / "master_spreadsheet.csv").write_bytes(text)
    assert plan_source("brax", brax_copy).records == expected
    (brax_copy / "master_spreadsheet.csv").unlink()
    (brax_copy / f"{CSV}.gz").write_bytes(gzip.compress(text, mtime=0))
    assert plan_source("brax", brax_copy).records == expected
    assert plan_source("brax", brax_copy.parent).root == brax_copy.resolve()  # parent works


def test_no_spreadsheet_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="master_spreadsheet_update.csv"):
        plan_source("brax", tmp_path)


# --- malformed metadata -------------------------------------------------------------------


def test_unknown_label_code_names_file_column_and_value(brax_copy: Path) -> None:
    frame = read_csv(brax_copy)
    row = frame.index[frame["ViewPosition"] == "PA"][0]
    frame.loc[row, "Cardiomegaly"] = "2.0"
    frame.to_csv(brax_copy / CSV, index=False)
    with pytest.raises(MetadataError, match=rf"{CSV}: column 'Cardiomegaly' has values \['2\.0'\]"):
        plan_source("brax", brax_copy)


@pytest.mark.parametrize("column", ["ViewPosition", "PngPath", "Pleural Other"])
def test_missing_column_is_named(brax_copy: Path, column: str) -> None:
    read_csv(brax_copy).drop(columns=[column]).to_csv(brax_copy / CSV, index=False)
    with pytest.raises(MetadataError, match=rf"{CSV}: missing columns \['{column}'\]"):
        plan_source("brax", brax_copy)


def test_optional_columns_may_be_absent(brax_copy: Path) -> None:
    frame = read_csv(brax_copy).drop(columns=["StudyDate", "Rows", "Columns", "Manufacturer"])
    frame.to_csv(brax_copy / CSV, index=False)
    records = plan_source("brax", brax_copy).records
    assert records and all(set(r.extras) <= {"age_bin"} for r in records)


def test_prefer_jpg_is_refused(sample_roots_pristine: dict[str, Path]) -> None:
    with pytest.raises(MetadataError, match=r"--prefer jpg: BRAX .* \['png', 'dicom'\]"):
        plan_source("brax", sample_roots_pristine["brax"], PlanOptions(prefer="jpg"))


# --- builds -------------------------------------------------------------------------------


def test_prefer_dicom_plans_and_builds_the_same_images(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    root = sample_roots_pristine["brax"]
    png, dicom = plan_source("brax", root), plan_source("brax", root, PlanOptions(prefer="dicom"))
    assert all(r.path.endswith(".png") for r in png.records)
    assert all(r.path.endswith(".dcm") and "/Anonymized_DICOMs/" in r.path for r in dicom.records)
    assert all(r.source_key.startswith("Anonymized_DICOMs/") for r in dicom.records)
    assert [r.key for r in dicom.records] == [r.key for r in png.records]

    results = {}
    for prefer in (None, "dicom"):
        out = tmp_path / (prefer or "png")
        results[prefer] = build_source("brax", root, out, BuildOptions(prefer=prefer, workers=1))
    assert results[None].failed == results["dicom"].failed == 0
    assert results["dicom"].built == results[None].built == len(png.records)
    images = {p: load_manifest(tmp_path / (p or "png"), "images") for p in (None, "dicom")}
    png_images, dicom_images = (images[p].set_index("key").sort_index() for p in (None, "dicom"))
    assert dicom_images.index.tolist() == png_images.index.tolist()
    assert set(dicom_images["bits"]) == set(png_images["bits"]) == {12}
    # The twins hold the same 12-bit pixels: the two pipelines give the same output bytes.
    assert dicom_images["sha256"].tolist() == png_images["sha256"].tolist()


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefer", [[], ["--prefer", "dicom"]])
def test_cli_dry_run_json_shows_path_rules(sample_roots_pristine, prefer: list[str]) -> None:
    root = sample_roots_pristine["brax"]
    args = ["build", "--source", "brax", "--root", str(root), "--dry-run", "--json", *prefer]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["sources"]["brax"]
    assert summary["path_rules"] == {"as_given": 5, "by_name": 1, "minus_7_chars": 1, "missing": 0}
    assert summary["to_build"] == 7 and summary["by_split"] == {"train": 7}


def test_cli_prefer_jpg_exits_2(sample_roots_pristine) -> None:
    root = sample_roots_pristine["brax"]
    args = ["build", "-s", "brax", "--root", str(root), "--dry-run", "--prefer", "jpg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--prefer jpg" in result.output
