"""PadChest: the full real CSV against the paper (96,287 AP/PA rows, 96,278 built), its labels,
ages and reports row by row; then the miniature: view groups, layouts, names with spaces,
unknown and malformed labels, failures in a build, --intensity window, and the CLI's dry run
beside the paper's Table 1."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.machex_cli import app
from machex.adapters import MetadataError
from machex.adapters.base import PlanOptions, make_key
from machex.adapters.padchest import METADATA, parse_label_list
from machex.build import BuildOptions, build_source, plan_source
from machex.imaging import Intensity, PixelOptions
from machex.manifests import load_manifest
from machex.records import FINDINGS, ReportChoice
from machex.sample.padchest import PADCHEST_CSV, make_padchest
from machex.shards import read_member
from machex.tables import ViewSelection, load_source_tables, tables_root

READ = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth")
READ += ("PatientSex_DICOM", "Projection", "Report", "Labels", "WindowCenter_DICOM")
READ += ("WindowWidth_DICOM",)
#: MaCheX v1's veto list as its code spells it (SOURCES.md section 4): 9 names the CSV has,
#: 3 written with spaces around the hyphens (the CSV spells them without).
V1_VETO = (
    "216840111366964013076187734852011291090445391_00-196-188.png",
    "216840111366964012339356563862009072111404053_00-043-192.png",
    "216840111366964012373310883942009170084120009_00-097-074.png",
    "216840111366964012989926673512011074122523403_00-163-058.png",
    "216840111366964012959786098432011033083840143_00-176-115.png",
    "216840111366964012558082906712009327122220177_00-102-064.png",
    "216840111366964012819207061112010307142602253_04-014-084.png",
    "232387753838738339711526121280969069202_3kz4uc.png",
    "16318114638720496804398478863603181862_hsqx37.png",
    "216840111366964012373310883942009183085424538_00 - 030 - 080.png",
    "216840111366964012373310883942009118085640636_00 - 070 - 094.png",
    "216840111366964012487858717522009209140601076_00 - 032 - 109.png",
)
#: Published as bad elsewhere, not skipped here (docs/sources/padchest.md): they become
#: failure records if they do not decode. MaCheX HEAD's 4 additions, torchxrayvision's 10.
OTHER_BAD = (
    "216840111366964012373310883942009117084022290_00-064-025.png",
    "216840111366964012283393834152009033102258826_00-059-087.png",
    "216840111366964012819207061112010306085429121_04-020-102.png",
    "216840111366964012819207061112010315104455352_04-024-184.png",
    "216840111366964012989926673512011083134050913_00-168-009.png",
    "216840111366964012373310883942009152114636712_00-102-045.png",
    "216840111366964012819207061112010281134410801_00-129-131.png",
    "216840111366964012487858717522009280135853083_00-075-001.png",
    "216840111366964012989926673512011151082430686_00-157-045.png",
    "216840111366964013686042548532013208193054515_02-026-007.png",
    "216840111366964013590140476722013058110301622_02-056-111.png",
    "216840111366964013590140476722013043111952381_02-065-198.png",
    "216840111366964013829543166512013353113303615_02-092-190.png",
    "216840111366964013962490064942014134093945580_01-178-104.png",
)

#: The tags that say nothing about the findings (manifests/padchest/uninformative.csv).
SAY_NOTHING = {"exclude", "unchanged", "suboptimal study"}


def views(spec: str) -> PlanOptions:
    return PlanOptions(views=ViewSelection.parse(spec))


def names_of(cell: str) -> list[str]:
    """The label names of a ``Labels`` cell, parsed here independently of the adapter."""
    if cell.strip() == "nan":
        return []
    return list(dict.fromkeys(n.strip() for n in ast.literal_eval(cell) if n.strip()))


# --- the full real CSV ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_root(real_metadata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("padchest")
    (root / f"{METADATA}.gz").symlink_to(real_metadata / f"{METADATA}.gz")
    return root


@pytest.fixture(scope="module")
def real_frame(real_root: Path) -> pd.DataFrame:
    return pd.read_csv(
        real_root / f"{METADATA}.gz", dtype=str, keep_default_na=False, usecols=list(READ)
    )


@pytest.fixture(scope="module")
def real_plan(real_root: Path):
    return plan_source("padchest", real_root)


def test_real_dry_run_gives_the_papers_96278(real_plan, real_frame) -> None:
    summary = real_plan.summary()
    assert len(real_frame) == 160_861
    assert summary["planned"] == 96_287  # Projection PA or AP
    assert summary["to_build"] == 96_278  # less the 9 files MaCheX v1 vetoed: the paper's count
    assert summary["known_bad"] == 9
    assert summary["by_view"] == {"PA": 91_721, "AP": 4_557}
    assert summary["by_split"] == {"train": 96_278}
    assert summary["skipped"] == {
        "ap_horizontal": 14_346,
        "lateral": 49_579,
        "costal": 630,
        "excluded": 11,
        "unknown_projection": 8,
    }
    assert summary["missing_files"] == 96_278  # metadata only: no images here
    assert summary["path_rules"] == {"image_dir": 0, "images": 0, "by_name": 0, "missing": 96_287}
    assert summary["warnings"] == []  # labels.csv lists every label name of the release


def test_real_known_bad_are_the_v1_veto_names_in_their_folders(real_plan, real_frame) -> None:
    tables = load_source_tables("padchest")
    listed = {f"{d}/{n}" for d, n in zip(real_frame["ImageDir"], real_frame["ImageID"])}
    assert set(tables.known_bad) <= listed
    assert sorted(real_plan.known_bad) == sorted(tables.known_bad)
    names = set(real_frame["ImageID"])
    in_csv = {n for n in V1_VETO if n in names}
    assert {k.split("/", 1)[1] for k in tables.known_bad} == in_csv and len(in_csv) == 9
    # The 3 names MaCheX spelled with spaces, and the other published lists, are built: a
    # file that really does not decode becomes a failure record (docs/sources/padchest.md).
    built = {r.source_key.split("/", 1)[1] for r in real_plan.records}
    unspaced = {n.replace(" - ", "-") for n in V1_VETO if " " in n}
    frontal = set(real_frame.loc[real_frame["Projection"].isin(["PA", "AP"]), "ImageID"])
    assert unspaced <= built
    assert {n for n in OTHER_BAD if n in frontal} <= built
    assert len({n for n in OTHER_BAD if n in frontal}) == 10  # torchxrayvision's, all PA


def test_real_ap_horizontal_is_a_group_to_add(real_root: Path) -> None:
    summary = plan_source("padchest", real_root, views("+ap_horizontal")).summary()
    assert summary["planned"] == 110_633
    assert summary["to_build"] == 110_624
    assert summary["by_view"] == {"PA": 91_721, "AP": 4_557, "AP_horizontal": 14_346}
    assert "ap_horizontal" not in summary["skipped"]


def test_real_lateral_views_are_the_l_rows(real_root: Path, real_frame) -> None:
    plan = plan_source("padchest", real_root, views("lateral"))
    lateral = real_frame[real_frame["Projection"] == "L"]
    assert plan.summary()["by_view"] == {"L": len(lateral)} == {"L": 49_579}
    assert sorted(r.key for r in plan.records) == sorted(
        make_key("padchest", n.removesuffix(".png")) for n in lateral["ImageID"]
    )
    assert plan.skipped["frontal"] == 96_287


def test_real_labels_match_the_csv(real_plan, real_frame) -> None:
    """Row by row on a sample of 2,000 rows, then whole-file counts from the raw text."""
    tables = load_source_tables("padchest")
    frontal = real_frame[real_frame["Projection"].isin(["PA", "AP"])].set_index("ImageID")
    by_key = {r.key: r for r in real_plan.records}
    sample = frontal.sample(2_000, random_state=0)
    for name, row in sample.iterrows():
        record = by_key.get(make_key("padchest", name.removesuffix(".png")))
        if record is None:
            assert f"{row['ImageDir']}/{name}" in tables.known_bad
            continue
        names = names_of(row["Labels"])
        assert list(record.native_labels) == names
        if set(names) <= SAY_NOTHING:  # unlabelled, or only 'exclude' etc.: nothing is known
            assert set(record.labels.values()) == {None}
            continue
        expected = {f: tables.absent.get(f) for f in FINDINGS}
        for n in names:
            for finding in tables.label_map[n]:
                expected[finding] = 1
        if any(expected[f] == 1 for f in FINDINGS if f not in ("No Finding", "Support Devices")):
            expected["No Finding"] = 0
        assert record.labels == expected, name
    labels = pd.DataFrame([r.labels for r in real_plan.records])
    built = frontal[~(frontal["ImageDir"] + "/" + frontal.index).isin(list(tables.known_bad))]

    def listed(*names: str) -> pd.Series:
        alternatives = "|".join(re.escape(n) for n in names)
        return built["Labels"].str.contains(rf"'\s*(?:{alternatives})'")

    assert (labels["Cardiomegaly"] == 1).sum() == listed("cardiomegaly").sum() == 8_778
    assert (labels["Pneumothorax"] == 1).sum() == listed("pneumothorax", "hydropneumothorax").sum()
    effusions = ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion")
    effusion = listed(*effusions, "hydropneumothorax", "empyema")
    assert (labels["Pleural Effusion"] == 1).sum() == effusion.sum() == 3_958
    devices = [n for n, f in tables.label_map.items() if "Support Devices" in f]
    assert (labels["Support Devices"] == 1).sum() == listed(*devices).sum() == 5_549
    unlabelled = built["Labels"].isin(["nan", "['']"])
    assert unlabelled.sum() == 523
    # Only tags that say nothing about the findings: not 13 fabricated negatives each.
    say_nothing = built["Labels"].map(
        lambda cell: len(names_of(cell)) > 0 and set(names_of(cell)) <= SAY_NOTHING
    )
    assert say_nothing.sum() == 2_913
    assert labels["Cardiomegaly"].isna().sum() == 523 + 2_913
    quiet = [
        r for r in real_plan.records if r.native_labels and set(r.native_labels) <= SAY_NOTHING
    ]
    assert len(quiet) == 2_913 and all(set(r.labels.values()) == {None} for r in quiet)
    assert (labels["Enlarged Cardiomediastinum"].fillna(1) == 1).all()  # never a 0
    # normal beside a pathology is not No Finding (PadChest tags sentences)
    normal = listed("normal")
    assert (labels["No Finding"] == 1).sum() == 34_917 == normal.sum() - 84
    # The figures of docs/sources/padchest.md
    positives = {f: int((labels[f] == 1).sum()) for f in FINDINGS}
    assert positives == {
        "No Finding": 34_917,
        "Enlarged Cardiomediastinum": 663,
        "Cardiomegaly": 8_778,
        "Lung Opacity": 17_347,
        "Lung Lesion": 3_135,
        "Edema": 462,
        "Consolidation": 1_070,
        "Pneumonia": 3_893,
        "Atelectasis": 4_428,
        "Pneumothorax": 295,
        "Pleural Effusion": 3_958,
        "Pleural Other": 3_373,
        "Fracture": 2_699,
        "Support Devices": 5_549,
    }
    assert len({r.patient_id for r in real_plan.records}) == 63_943
    mapped = [n for n, findings in tables.label_map.items() if findings]
    assert len(tables.label_map) == 193 and len(mapped) == 73


def test_every_label_name_of_the_release_is_in_labels_csv(real_frame) -> None:
    names = {n for cell in real_frame["Labels"].unique() for n in names_of(cell)}
    assert len(names) == 193
    assert names == set(load_source_tables("padchest").label_map)


def test_real_ages_sexes_windows_and_ids(real_plan, real_frame) -> None:
    rows = real_frame.set_index("ImageID")
    records = real_plan.records
    for record in records[::97]:
        row = rows.loc[Path(record.source_key).name]
        assert record.patient_id == row["PatientID"] and record.study_id == row["StudyID"]
        if row["PatientBirth"]:
            assert record.age == int(row["StudyDate_DICOM"][:4]) - int(float(row["PatientBirth"]))
        else:
            assert record.age is None
        if row["WindowCenter_DICOM"] == "None":
            assert record.window is None and "window_center" not in record.extras
        else:
            expected = (float(row["WindowCenter_DICOM"]), float(row["WindowWidth_DICOM"]))
            assert record.window == expected
    ages = [r.age for r in records if r.age is not None]
    assert (min(ages), max(ages), len(records) - len(ages)) == (0, 105, 3)
    assert Counter(r.sex for r in records) == {"F": 49_014, "M": 47_251, "O": 10, None: 3}
    assert sum(r.window is None for r in records) == 634
    # Literal placeholders never become values.
    for record in records:
        assert all(v not in ("nan", "None", "") for v in record.extras.values())
        assert record.sex not in ("nan", "None")


def test_real_reports_are_spanish_and_never_conditioning_text(real_plan, real_frame) -> None:
    reports = {r.key: r.report for r in real_plan.records}
    with_text = [r for r in reports.values() if r is not None]
    assert len(with_text) == 96_175 and len(reports) - len(with_text) == 103
    assert {r.language for r in with_text} == {"es"}
    assert all(r.findings is r.impression is r.text_v1 is None for r in with_text)
    rows = real_frame.set_index("ImageID")
    for record in real_plan.records[::101]:
        cell = rows.loc[Path(record.source_key).name, "Report"].strip()
        if cell == "nan" or not re.search(r"[a-z0-9]", cell):
            assert record.report is None
        else:
            assert record.report.text == cell and record.report.study_id == record.study_id
    # The default choice conditions on English text only; --report-languages es opts in.
    record = next(r for r in real_plan.records if r.report)
    assert ReportChoice().text(record.report) is None
    assert ReportChoice("text", ("es",)).text(record.report) == record.report.text


def test_cli_dry_run_shows_96278_against_the_paper(real_root: Path) -> None:
    args = ["build", "--source", "padchest", "--root", str(real_root), "--dry-run", "--json"]
    result = CliRunner().invoke(app, [*args, "--composition", "paper-2023"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["sources"]["padchest"]["to_build"] == 96_278
    row = next(r for r in document["paper"]["rows"] if r["source"] == "padchest")
    assert row["paper"]["in_machex"] == row["ours"]["in_composition"] == 96_278
    assert row["status"] == "match"


# --- the miniature ---------------------------------------------------------------------------


@pytest.fixture
def copy(sample_roots_pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the PadChest miniature only."""
    return Path(shutil.copytree(sample_roots_pristine["padchest"], tmp_path / "PadChest"))


def read_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / PADCHEST_CSV, dtype=str, keep_default_na=False)


def rewrite(root: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(root / PADCHEST_CSV, index=False)


def test_sample_has_the_real_header(sample_roots_pristine, real_metadata: Path) -> None:
    header = (sample_roots_pristine["padchest"] / PADCHEST_CSV).read_text().split("\n", 1)[0]
    with gzip.open(real_metadata / f"{METADATA}.gz", "rt") as real:
        assert header == real.readline().rstrip("\n")


def test_sample_covers_the_quirks(sample_roots_pristine) -> None:
    frame = read_csv(sample_roots_pristine["padchest"])
    assert frame.columns[0].startswith("Unnamed") and len(frame.columns) == 36  # blank header
    assert set(frame["Projection"]) == {"PA", "AP", "AP_horizontal", "L", "COSTAL"}
    assert {"nan", "['']"} <= set(frame["Labels"])
    assert frame["Labels"].str.contains("' normal'").any()  # a leading-space name
    assert frame["ImageID"].str.contains(" ").sum() == 1
    assert {"nan", "O"} <= set(frame["PatientSex_DICOM"]) and "" in set(frame["PatientBirth"])
    assert set(frame["BitsStored_DICOM"]) == {"10", "12"} and "None" in set(
        frame["WindowCenter_DICOM"]
    )
    assert set(frame["ImageDir"]) == {"0", "1", "54"}


def test_sample_views_by_group(sample_roots_pristine) -> None:
    root = sample_roots_pristine["padchest"]
    frame = read_csv(root)
    counts = frame["Projection"].value_counts().to_dict()
    default = plan_source("padchest", root).summary()
    assert default["by_view"] == {"PA": counts["PA"], "AP": counts["AP"]}
    assert default["skipped"] == {
        "lateral": counts["L"],
        "ap_horizontal": counts["AP_horizontal"],
        "costal": counts["COSTAL"],
    }
    lateral = plan_source("padchest", root, views("lateral"))
    assert {r.view for r in lateral.records} == {"L"} and len(lateral.records) == counts["L"]
    every = plan_source("padchest", root, views("all")).summary()["by_view"]
    assert every == {"PA": counts["PA"], "AP": counts["AP"], "L": counts["L"]}
    supine = plan_source("padchest", root, views("+ap_horizontal")).summary()["by_view"]
    assert supine["AP_horizontal"] == counts["AP_horizontal"] == 2
    assert plan_source("padchest", root, views("costal")).summary()["by_view"] == {"COSTAL": 1}


def test_sample_records_match_the_csv_cells(sample_roots_pristine) -> None:
    root = sample_roots_pristine["padchest"]
    frame = read_csv(root).set_index("ImageID")
    plan = plan_source("padchest", root, views("all,ap_horizontal,costal"))
    assert len(plan.records) == len(frame) == 12 and plan.missing_files == 0
    for record in plan.records:
        name = Path(record.path).name
        row = frame.loc[name]
        assert record.key == make_key("padchest", name.removesuffix(".png"))
        assert record.source_key == f"{row['ImageDir']}/{name}"
        assert Path(record.path) == root / row["ImageDir"] / name
        assert (record.patient_id, record.study_id) == (row["PatientID"], row["StudyID"])
        assert record.view == row["Projection"] and record.split == "train"
        assert record.sex == (None if row["PatientSex_DICOM"] == "nan" else row["PatientSex_DICOM"])
        birth = row["PatientBirth"]
        expected_age = int(row["StudyDate_DICOM"][:4]) - int(float(birth)) if birth else None
        assert record.age == expected_age
        assert list(record.native_labels) == names_of(row["Labels"])
        report = row["Report"].strip()
        assert (record.report.text if record.report else "nan") == report
        assert record.extras["image_dir"] == int(row["ImageDir"])
        assert record.extras["bits_stored"] == int(row["BitsStored_DICOM"])
        assert record.extras["pediatric"] == row["Pediatric"]
        assert set(record.extras) <= {
            "image_dir",
            "bits_stored",
            "window_center",
            "window_width",
            "method_projection",
            "method_label",
            "pediatric",
        }


def test_normal_beside_a_finding_is_not_no_finding(sample_roots_pristine) -> None:
    records = plan_source("padchest", sample_roots_pristine["padchest"]).records
    tube = next(r for r in records if "NSG tube" in r.native_labels)
    assert tube.native_labels == ("NSG tube", "normal", "alveolar pattern")  # ' normal' stripped
    assert tube.labels["Support Devices"] == tube.labels["Lung Opacity"] == 1
    assert tube.labels["No Finding"] == 0
    normal = next(r for r in records if r.native_labels == ("normal",))
    assert normal.labels["No Finding"] == 1
    assert {f for f, v in normal.labels.items() if v is None} == {"Enlarged Cardiomediastinum"}
    unlabelled = [r for r in records if not r.native_labels]
    assert len(unlabelled) == 2  # nan and ['']
    assert all(set(r.labels.values()) == {None} for r in unlabelled)


def test_unknown_label_names_are_kept_and_reported_once(copy: Path) -> None:
    frame = read_csv(copy)
    frontal = frame.index[frame["Projection"].isin(["PA", "AP"])]
    frame.loc[frontal[0], "Labels"] = "['cardiomegaly', 'brand new sign']"
    frame.loc[frontal[1], "Labels"] = "[' brand new sign']"
    frame.loc[frontal[2], "Labels"] = "['another new sign']"
    rewrite(copy, frame)
    plan = plan_source("padchest", copy)
    assert len(plan.warnings) == 1
    assert "2 label names are not in manifests/padchest/labels.csv (3 times)" in plan.warnings[0]
    assert "brand new sign" in plan.warnings[0]
    first = next(r for r in plan.records if r.source_key.endswith(frame.loc[frontal[0], "ImageID"]))
    assert first.native_labels == ("cardiomegaly", "brand new sign")
    assert first.labels["Cardiomegaly"] == 1 and first.labels["No Finding"] == 0
    second = next(r for r in plan.records if "another new sign" in r.native_labels)
    assert second.labels["No Finding"] == 0 and second.labels["Cardiomegaly"] == 0
    assert plan.summary()["to_build"] == 7  # nothing is skipped for it


def test_malformed_labels_are_skipped_counted_and_named(copy: Path) -> None:
    frame = read_csv(copy)
    pa = frame.index[frame["Projection"] == "PA"]
    frame.loc[pa[0], "Labels"] = "['normal'"
    frame.loc[pa[1], "Labels"] = "[1, 2]"
    frame.loc[frame.index[frame["Projection"] == "L"][0], "Labels"] = "broken"  # not planned
    rewrite(copy, frame)
    plan = plan_source("padchest", copy)
    assert plan.skipped["malformed_labels"] == 2
    assert plan.summary()["to_build"] == 5
    assert f"rows {[int(pa[0]) + 2, int(pa[1]) + 2]}" in plan.warnings[0]
    assert parse_label_list("['a', ' b', '', 'a']") == ("a", "b")
    assert parse_label_list(" nan ") == parse_label_list("[]") == ()
    assert parse_label_list("{'a'}") is None and parse_label_list("os.system('x')") is None


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_other_layouts_give_the_same_records(copy: Path, layout: str, monkeypatch) -> None:
    expected = plan_source("padchest", copy)
    pngs = sorted(copy.glob("*/*.png"))
    target = copy / ("images" if layout == "flat" else "unpacked/zips/all")
    target.mkdir(parents=True)
    for png in pngs:
        png.rename(target / png.name)
    plan = plan_source("padchest", copy)
    rule = "images" if layout == "flat" else "by_name"
    assert plan.path_rules == {"image_dir": 0, "images": 0, "by_name": 0, "missing": 0} | {rule: 7}
    assert [r.source_key for r in plan.records] == [r.source_key for r in expected.records]
    assert all(Path(r.path).parent == target for r in plan.records)
    # known_bad.csv entries (<ImageDir>/<ImageID>) match whatever the layout
    tables = copy.parent / "tables"
    shutil.copytree(tables_root(), tables)
    victim = next(r for r in plan.records if " " in r.source_key)
    with (tables / "padchest" / "known_bad.csv").open("a") as handle:
        handle.write(f"{victim.source_key},test\n")
    monkeypatch.setenv("MACHEX_TABLES", str(tables))
    vetoed = plan_source("padchest", copy)
    assert vetoed.known_bad == [victim.source_key]
    assert victim.key not in {r.key for r in vetoed.records}


def test_a_name_with_spaces(sample_roots_pristine) -> None:
    plan = plan_source("padchest", sample_roots_pristine["padchest"])
    record = next(r for r in plan.records if " " in r.source_key)
    assert " - " in Path(record.path).name and Path(record.path).is_file()
    assert " " not in record.key and record.key.count("_-_") == 2


def test_gzip_missing_column_and_parent_root(copy: Path) -> None:
    expected = plan_source("padchest", copy).records
    csv_path = copy / PADCHEST_CSV
    (copy / f"{PADCHEST_CSV}.gz").write_bytes(gzip.compress(csv_path.read_bytes(), mtime=0))
    csv_path.unlink()
    assert plan_source("padchest", copy).records == expected
    assert plan_source("padchest", copy.parent).root == copy.resolve()
    frame = pd.read_csv(copy / f"{PADCHEST_CSV}.gz", dtype=str, keep_default_na=False)
    frame.drop(columns=["Projection", "Pediatric"]).to_csv(copy / PADCHEST_CSV, index=False)
    (copy / f"{PADCHEST_CSV}.gz").unlink()
    with pytest.raises(MetadataError, match=r"missing columns \['Projection'\]"):
        plan_source("padchest", copy)


def test_optional_columns_may_be_absent(copy: Path) -> None:
    frame = read_csv(copy)
    optional = ["MethodProjection", "MethodLabel", "Pediatric", "BitsStored_DICOM"]
    rewrite(copy, frame.drop(columns=[*optional, "WindowCenter_DICOM", "WindowWidth_DICOM"]))
    records = plan_source("padchest", copy).records
    assert records and all(set(r.extras) == {"image_dir"} and r.window is None for r in records)


def test_no_metadata_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=re.escape(METADATA)):
        plan_source("padchest", tmp_path)


def test_sample_is_byte_identical_for_one_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    a = make_padchest(tmp_path / "a", np.random.default_rng(3))
    b = make_padchest(tmp_path / "b", np.random.default_rng(3))
    assert digest(a) == digest(b) and len(digest(a)) == 13


# --- builds ----------------------------------------------------------------------------------


def test_missing_and_undecodable_files_become_failures(copy: Path, tmp_path: Path) -> None:
    plan = plan_source("padchest", copy)
    missing, garbage = plan.records[0], plan.records[1]
    Path(missing.path).unlink()
    Path(garbage.path).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert plan_source("padchest", copy).path_rules["missing"] == 1
    out = tmp_path / "out"
    result = build_source("padchest", copy, out, BuildOptions(workers=1, max_failure_rate=1))
    assert (result.built, result.failed) == (len(plan.records) - 2, 2)
    failures = load_manifest(out, "failures").set_index("key")
    assert failures.loc[missing.key, "error_type"] == "FileNotFoundError"
    assert failures.loc[missing.key, "source_key"] == missing.source_key
    assert failures.loc[garbage.key, "error_type"] != "FileNotFoundError"
    images = load_manifest(out, "images")
    assert set(images["bits"]) <= {10, 12}
    reports = load_manifest(out, "reports")
    assert set(reports["language"]) == {"es"} and reports["text_v1"].isna().all()


def test_window_reaches_the_pixel_pipeline(sample_roots_pristine, tmp_path: Path) -> None:
    root = sample_roots_pristine["padchest"]
    out = tmp_path / "out"
    options = BuildOptions(pixels=PixelOptions(intensity=Intensity.window), workers=1)
    assert build_source("padchest", root, out, options).failed == 0
    windows = {r.key: r.window for r in plan_source("padchest", root).records}
    assert None in windows.values()
    images = load_manifest(out, "images")
    for row in images.itertuples():
        with tarfile.open(out / row.shard) as tar:
            meta = json.loads(tar.extractfile(f"{row.key}.json").read())
        assert meta["intensity"] == ("raw" if windows[row.key] is None else "window")
        assert meta["report"] is None  # es: not conditioning text by default
        assert meta["report_sections"] is None or meta["report_sections"]["language"] == "es"


def test_compat_machex_v1_builds_the_16_bit_pngs(sample_roots_pristine, tmp_path: Path) -> None:
    """--compat machex-v1: the original >> 8 of the 16-bit values, as RGB JPEG."""
    root = sample_roots_pristine["padchest"]
    out = tmp_path / "out"
    options = BuildOptions(pixels=PixelOptions(compat="machex-v1"), workers=1)
    assert build_source("padchest", root, out, options).failed == 0
    row = load_manifest(out, "images").iloc[0]
    data = read_member(out / row["shard"], row["offset"], row["size"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        # 12-bit values >> 8 leave 0..15: the original's dark images, reproduced
        assert max(image.convert("L").getextrema()) <= 16
