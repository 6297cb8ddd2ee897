"""Open-i: the real report XML and per-image view table (counts checked independently of the
adapter), the section parse against the raw XML, the miniature built end to end, and what a
damaged copy does (malformed XML, a missing PNG, no view table)."""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from machex.adapters import MetadataError
from machex.adapters.base import PlanOptions
from machex.adapters.openi import TermMap, metadata_id, parse_report
from machex.build import BuildOptions, build_source, plan_source
from machex.manifests import load_manifest
from machex.records import FINDINGS, ReportChoice
from machex.sample.openi import REPORTS, make_openi, write_reports_tgz
from machex.tables import ViewSelection, load_source_tables

TGZ = "NLMCXR_reports.tgz"
CSV = "nlmcxr_dicom_metadata.csv.gz"


def report_files(tgz: Path) -> dict[str, str]:
    """``{member name: text}`` of every XML file in the tarball."""
    with tarfile.open(tgz) as archive:
        return {
            m.name: archive.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile() and m.name.endswith(".xml")
        }


def raw_section(text: str, label: str) -> str | None:
    """A section's text straight from the XML text (regex, not a parser)."""
    match = re.search(rf'<AbstractText Label="{label}">(.*?)</AbstractText>', text, re.S)
    return html.unescape(match.group(1)).strip() or None if match else None


def raw_images(text: str) -> list[str]:
    return re.findall(r'<parentImage id="([^"]+)"', text)


def raw_major(text: str) -> list[str]:
    return [html.unescape(t).strip() for t in re.findall(r"<major>(.*?)</major>", text)]


# --- the real reports and view table ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_root(real_metadata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openi")
    for name in (TGZ, CSV):
        shutil.copy(real_metadata / name, root / name)
    return root


@pytest.fixture(scope="module")
def real_plan(real_root: Path):
    return plan_source("openi", real_root)


@pytest.fixture(scope="module")
def real_xml(real_root: Path) -> dict[str, str]:
    return report_files(real_root / TGZ)


@pytest.fixture(scope="module")
def real_images(real_xml: dict[str, str], real_root: Path) -> pd.DataFrame:
    """One row per listed image with its report and View Position: joined here with pandas
    and a regex over the raw XML, not with the adapter's code."""
    rows = [
        (name, re.search(r'<uId id="([^"]+)"', text).group(1), image_id)  # type: ignore[union-attr]
        for name, text in real_xml.items()
        for image_id in raw_images(text)
    ]
    images = pd.DataFrame(rows, columns=["file", "report", "image_id"])
    views = pd.read_csv(real_root / CSV, dtype=str, keep_default_na=False)
    views = views[["imageid", "View Position"]].rename(
        columns={"imageid": "dicom_id", "View Position": "view"}
    )
    # report 1 alone writes its ids with an extra "_1": CXR1_1_IM-0001-3001 -> CXR1_IM-...
    images["dicom_id"] = images["image_id"].str.replace(r"^CXR1_1_", "CXR1_", regex=True)
    return images.merge(views, on="dicom_id", how="left")


def test_real_counts_match_the_xml_and_the_view_table(real_plan, real_xml, real_images) -> None:
    assert len(real_xml) == 3955  # reports
    assert len(real_images) == real_images["image_id"].nunique() == 7470  # images listed
    assert sum(not raw_images(t) for t in real_xml.values()) == 104  # reports without images
    views = real_images["view"].fillna("<no row>").value_counts().to_dict()
    assert views == {
        "PA": 3593,
        "": 2586,
        "LL": 717,
        "AP": 423,
        "LATERAL": 119,
        "RL": 29,
        "LARGE LATERAL": 2,
        "<no row>": 1,
    }
    frontal = real_images[real_images["view"].isin(["PA", "AP"])]
    summary = real_plan.summary()
    assert summary["planned"] == summary["to_build"] == len(frontal) == 4016
    assert summary["by_view"] == {"AP": 423, "PA": 3593}
    assert summary["by_split"] == {"train": 4016}
    assert summary["skipped"] == {"lateral": 717 + 119 + 29 + 2, "unknown_view": 2586 + 1}
    assert summary["missing_files"] == 4016  # metadata only, no PNGs here
    assert any("no image: 104" in w for w in summary["warnings"])
    assert any("2586 blank" in w and "1 without a row" in w for w in summary["warnings"])
    # one record per frontal image, keyed by its id, its report as patient and study
    assert sorted(r.key for r in real_plan.records) == sorted("openi-" + frontal["image_id"])
    by_key = {r.key: r for r in real_plan.records}
    for row in frontal.sample(200, random_state=0).itertuples():
        record = by_key[f"openi-{row.image_id}"]
        assert record.view == row.view
        assert record.patient_id == record.study_id == row.report
        assert record.source_key == f"NLMCXR_png/{row.image_id}.png"
        assert record.extras["report_file"] == row.file
    # report 1's ids keep their "_1" in the key and the PNG name, and find their view
    first = by_key["openi-CXR1_1_IM-0001-3001"]
    assert first.view == "PA" and first.source_key == "NLMCXR_png/CXR1_1_IM-0001-3001.png"


def test_real_labels_follow_the_mesh_major_terms(real_plan, real_xml, real_images) -> None:
    majors = {
        re.search(r'<uId id="([^"]+)"', text).group(1): raw_major(text)  # type: ignore[union-attr]
        for text in real_xml.values()
    }
    records = real_plan.records

    def count(finding: str) -> int:
        return sum(r.labels[finding] == 1 for r in records)

    def having(predicate) -> int:
        return sum(any(predicate(t) for t in majors[r.study_id]) for r in records)

    assert count("No Finding") == having(lambda t: t == "normal") == 1532
    cardio = having(
        lambda t: (
            (t.startswith("Cardiomegaly") and not t.startswith("Cardiomegaly/borderline"))
            or t.startswith("Cardiac Shadow/enlarged")
        )
    )
    assert count("Cardiomegaly") == cardio == 344
    assert count("Pleural Effusion") == having(
        lambda t: t.startswith(("Pleural Effusion", "Hydropneumothorax"))
    )
    assert count("Pneumothorax") == having(
        lambda t: t.startswith(("Pneumothorax", "Hydropneumothorax", "Hemopneumothorax"))
    )
    assert count("Lung Lesion") == having(lambda t: t.startswith(("Nodule/lung", "Mass/lung")))
    assert count("Fracture") == having(lambda t: t.startswith("Fractures, Bone")) == 80
    assert count("Atelectasis") == having(lambda t: t.startswith("Pulmonary Atelectasis"))
    # MeSH indexing lists what a report says: nothing is ever a 0 or a -1
    assert {v for r in records for v in r.labels.values()} == {1, None}
    for record in records:  # every major term kept verbatim, mapped or not
        assert list(record.native_labels) == list(dict.fromkeys(majors[record.study_id]))
    # "normal" never comes with another term, so No Finding never sits beside a finding
    normal = [r for r in records if r.labels["No Finding"] == 1]
    assert all(r.native_labels == ("normal",) for r in normal)


def test_real_sections_match_the_raw_xml(real_plan, real_xml) -> None:
    """parse_report against a regex over the raw text, on a sample of the real reports (all
    with every section, empty or not), and the plan's reports against the same."""
    by_study = {r.study_id: r.report for r in real_plan.records}
    names = sorted(real_xml)
    rng = np.random.default_rng(0)
    checked_in_plan = 0
    for name in rng.choice(names, size=150, replace=False):
        text = real_xml[name]
        parsed = parse_report(text.encode("utf-8"))
        assert parsed.report_id == f"CXR{Path(name).stem}"
        assert [label for label, _ in parsed.sections] == [
            "COMPARISON",
            "INDICATION",
            "FINDINGS",
            "IMPRESSION",
        ]
        sections = {label: raw_section(text, label) for label, _ in parsed.sections}
        assert {label: body or None for label, body in parsed.sections} == sections
        assert list(parsed.images) == raw_images(text)
        report = parsed.report()
        assert report is not None and report.language == "en" and report.text_v1 is None
        assert report.findings == sections["FINDINGS"]
        assert report.impression == sections["IMPRESSION"]
        parts = [sections["FINDINGS"], sections["IMPRESSION"]]
        assert report.findings_impression == ("\n\n".join(p for p in parts if p) or None)
        expected_text = "\n".join(f"{k}: {v}" for k, v in sections.items() if v)
        assert report.text == expected_text
        if parsed.report_id in by_study:
            assert by_study[parsed.report_id] == report
            checked_in_plan += 1
    assert checked_in_plan > 50


def test_real_report_one(real_xml) -> None:
    parsed = parse_report(real_xml["ecgen-radiology/1.xml"].encode())
    report = parsed.report()
    assert parsed.images == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
    assert parsed.major == ("normal",)
    assert report is not None and report.study_id == "CXR1"
    assert report.findings is not None and report.findings.startswith("The cardiac silhouette")
    assert report.impression == "Normal chest x-XXXX."  # de-identification kept as released
    assert report.text.splitlines()[0] == "COMPARISON: None."


def test_metadata_id_only_touches_report_one() -> None:
    assert metadata_id("CXR1_1_IM-0001-3001") == "CXR1_IM-0001-3001"
    for image_id in ("CXR1000_IM-0003-2001", "CXR1021_IM-0017-1001-0001", "CXR10_IM-0002-1001"):
        assert metadata_id(image_id) == image_id


# --- the label rule ----------------------------------------------------------------------------


def test_terms_map_by_their_longest_listed_prefix() -> None:
    term_map = TermMap(load_source_tables("openi"))
    assert term_map("Cardiomegaly/mild") == ("Cardiomegaly",)
    assert term_map("Cardiomegaly/borderline") == ()  # listed with no finding
    assert term_map("Cardiomegaly/borderline/mild") == ()
    assert term_map("Nodule/lung/upper lobe/left") == ("Lung Lesion", "Lung Opacity")
    assert term_map("Nodule/breast/left") == ()
    assert term_map("Fractures, Bone/ribs/left") == ("Fracture",)
    assert term_map("fractures,  bone / ribs") == ("Fracture",)  # case and spaces
    assert term_map("Pulmonary Artery/enlarged") == ()  # unknown: no error
    assert term_map("normal") == ("No Finding",)


# --- the miniature ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openi(tmp_path_factory.mktemp("mini"), np.random.default_rng(3))


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def expected_frontal() -> list[str]:
    return sorted(
        f"openi-{image_id}"
        for report in REPORTS
        for image_id, view in report.images
        if view in ("PA", "AP")
    )


def test_miniature_plan(mini_root: Path) -> None:
    plan = plan_source("openi", mini_root)
    assert [r.key for r in plan.records] == expected_frontal()
    assert plan.skipped == {"lateral": 4, "unknown_view": 2}
    assert plan.missing_files == 0
    by_key = {r.key: r for r in plan.records}
    assert by_key["openi-CXR3_IM-1384-1001"].labels == {
        f: (1 if f in ("Cardiomegaly", "Pleural Effusion", "Support Devices") else None)
        for f in FINDINGS
    }
    assert by_key["openi-CXR6_IM-2192-2001"].labels["Lung Lesion"] is None  # a breast nodule
    assert by_key["openi-CXR8_IM-2333-1001"].labels["Lung Lesion"] == 1  # a lung nodule
    assert set(by_key["openi-CXR2_IM-0652-1001"].labels.values()) == {None}
    seven = by_key["openi-CXR7_IM-2263-1001-0001"].report
    assert seven is not None and seven.findings is None
    assert seven.findings_impression == seven.impression == "No acute cardiopulmonary abnormality."


def test_miniature_is_byte_identical_for_one_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    a = make_openi(tmp_path / "a", np.random.default_rng(7))
    b = make_openi(tmp_path / "b", np.random.default_rng(7))
    assert digest(a) == digest(b)


def test_miniature_builds_images_labels_and_reports(mini_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = BuildOptions(workers=1, report=ReportChoice("findings_impression"))
    result = build_source("openi", mini_root, out, options)
    frontal = expected_frontal()
    assert (result.built, result.failed) == (len(frontal), 0)
    images = load_manifest(out, "images")
    assert sorted(images["key"]) == frontal
    assert set(images["view"]) == {"PA", "AP"} and set(images["split"]) == {"train"}
    labels = load_manifest(out, "labels").set_index("key")
    assert labels.loc["openi-CXR1_1_IM-0001-3001", "No Finding"] == 1
    # one reports row per study with a built image, joined to images on study_id
    reports = load_manifest(out, "reports").set_index("study_id")
    assert sorted(reports.index) == sorted(set(images["study_id"]))
    assert reports.loc["CXR7", "findings"] is None or pd.isna(reports.loc["CXR7", "findings"])
    assert set(reports["language"]) == {"en"} and reports["text_v1"].isna().all()
    # the sample JSON carries the chosen conditioning text and the whole report
    for shard in sorted(out.glob("shards/openi/*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            sections = meta["report_sections"]
            assert meta["report"] == sections["findings_impression"]
            assert sections["study_id"] == meta["study_id"] == meta["patient_id"]
            assert meta["extras"]["report_file"].startswith("ecgen-radiology/")


def test_default_report_text_is_empty_for_openi(mini_root: Path, tmp_path: Path) -> None:
    """The default conditioning text is text_v1, which the original MaCheX never made for
    Open-i: the sample's ``report`` is null unless another text is chosen."""
    out = tmp_path / "out"
    build_source("openi", mini_root, out, BuildOptions(workers=1))
    shard = next(out.glob("shards/openi/*.tar"))
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert meta["report"] is None and meta["report_sections"]["text"]


def test_unpacked_reports_and_flat_pngs_give_the_same_plan(mini_root: Path, tmp_path) -> None:
    expected = plan_source("openi", mini_root).records
    root = copy_of(mini_root, tmp_path)
    with tarfile.open(root / TGZ) as archive:
        archive.extractall(root, filter="data")
    (root / TGZ).unlink()
    for png in (root / "NLMCXR_png").iterdir():  # the PNG tarball unpacked in the root
        png.rename(root / png.name)
    (root / "NLMCXR_png").rmdir()
    plan = plan_source("openi", root.parent)  # the parent works too
    assert [r.key for r in plan.records] == [r.key for r in expected]
    assert [r.report for r in plan.records] == [r.report for r in expected]
    assert [r.source_key for r in plan.records] == [r.source_key for r in expected]
    assert all(r.path is not None and Path(r.path).parent == root for r in plan.records)


def test_malformed_xml_is_skipped_counted_and_named(mini_root: Path, tmp_path: Path) -> None:
    root = copy_of(mini_root, tmp_path)
    files = {Path(n).name: t.encode() for n, t in report_files(root / TGZ).items()}
    files["4.xml"] = files["4.xml"][:700]  # truncated mid-element
    files["9.xml"] = b"<html><body>not a report</body></html>"
    write_reports_tgz(root / TGZ, files)
    plan = plan_source("openi", root)
    assert plan.skipped["malformed_report"] == 2
    warning = next(w for w in plan.warnings if "malformed_report" in w)
    assert "ecgen-radiology/4.xml (not well-formed XML" in warning
    assert "ecgen-radiology/9.xml (root element <html>" in warning
    assert not any(r.study_id == "CXR4" for r in plan.records)
    assert len(plan.records) == len(expected_frontal()) - 1  # report 4 had one frontal image


def test_a_missing_png_becomes_a_failure(mini_root: Path, tmp_path: Path) -> None:
    root = copy_of(mini_root, tmp_path)
    victim = "CXR4_IM-2050-2001"
    (root / "NLMCXR_png" / f"{victim}.png").unlink()
    plan = plan_source("openi", root)
    assert plan.missing_files == 1
    assert next(r for r in plan.records if r.key == f"openi-{victim}").path is None
    out = tmp_path / "out"
    result = build_source("openi", root, out, BuildOptions(workers=1, max_failure_rate=1))
    assert (result.built, result.failed) == (len(plan.records) - 1, 1)
    failures = load_manifest(out, "failures").set_index("key")
    assert failures.loc[f"openi-{victim}", "error_type"] == "FileNotFoundError"
    assert failures.loc[f"openi-{victim}", "source_key"] == f"NLMCXR_png/{victim}.png"
    # its study's report is still written: it describes the study, not the file
    assert "CXR4" in set(load_manifest(out, "reports")["study_id"])


def test_without_the_view_table_every_image_is_unknown(mini_root: Path, tmp_path: Path) -> None:
    root = copy_of(mini_root, tmp_path)
    (root / CSV).unlink()
    plan = plan_source("openi", root)
    assert plan.records == []
    assert plan.skipped == {"unknown_view": sum(len(r.images) for r in REPORTS)}
    assert any(CSV.removesuffix(".gz") in w and "unknown_view" in w for w in plan.warnings)
    # a plain (not gzipped) copy is read as well
    with gzip.open(mini_root / CSV, "rb") as handle:
        (root / CSV.removesuffix(".gz")).write_bytes(handle.read())
    assert [r.key for r in plan_source("openi", root).records] == expected_frontal()


def test_view_table_without_its_columns_is_named(mini_root: Path, tmp_path: Path) -> None:
    root = copy_of(mini_root, tmp_path)
    frame = pd.read_csv(root / CSV, dtype=str, keep_default_na=False)
    frame.drop(columns=["View Position"]).to_csv(root / CSV, index=False)
    with pytest.raises(MetadataError, match=r"nlmcxr_dicom_metadata\.csv\.gz.*View Position"):
        plan_source("openi", root)


def test_views_all_opens_the_laterals_but_never_unknown_views(mini_root: Path) -> None:
    plan = plan_source("openi", mini_root, PlanOptions(views=ViewSelection.parse("all")))
    views = Counter(r.view for r in plan.records)
    assert views == {"PA": 6, "AP": 2, "LL": 3, "LATERAL": 1}
    assert plan.skipped == {"unknown_view": 2}


def test_wrong_root_names_the_reports(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="NLMCXR_reports.tgz"):
        plan_source("openi", tmp_path)


def test_a_tarball_that_is_not_one_is_an_error(tmp_path: Path) -> None:
    (tmp_path / TGZ).write_bytes(b"not a tarball at all")
    with pytest.raises(MetadataError, match="cannot read as a .tgz"):
        plan_source("openi", tmp_path)
