"""VinDr-CXR: both layouts, every radiologist's box through the crop, votes and consensus,
failures, and no DICOM header value but the allow-list in any output byte."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from machex.adapters import MetadataError
from machex.build import BuildOptions, build_source, plan_source
from machex.imaging import PixelOptions, crop_box_for
from machex.manifests import load_manifest
from machex.records import FINDINGS
from machex.sample.dicom import write_dicom
from machex.sample.vindr import KAGGLE_HEADER, make_vindr


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vindr(tmp_path_factory.mktemp("vindr"), np.random.default_rng(5))


@pytest.fixture(scope="module")
def physionet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vindr(
        tmp_path_factory.mktemp("vindr"), np.random.default_rng(5), layout="physionet"
    )


@pytest.fixture(scope="module")
def kaggle_build(kaggle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    build_source("vindr", kaggle_root, out, BuildOptions(workers=1))
    return out


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / root.name
    shutil.copytree(root, target)
    return target


# --- the full real Kaggle train.csv ----------------------------------------------------------


@pytest.fixture(scope="module")
def real_plan(real_metadata: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vinbigdata")
    shutil.copy(real_metadata / "vinbigdata-train.csv.gz", root / "train.csv.gz")
    frame = pd.read_csv(real_metadata / "vinbigdata-train.csv.gz")
    return plan_source("vindr", root), frame


def test_dry_run_of_the_real_train_csv_gives_the_papers_15000(real_plan) -> None:
    plan, frame = real_plan
    summary = plan.summary()
    assert summary["planned"] == summary["to_build"] == 15_000
    assert summary["by_split"] == {"train": 15_000}
    assert summary["missing_files"] == 15_000  # metadata only: no DICOMs here
    assert summary["skipped"] == {}
    # every box row of the CSV becomes one box, with its reader
    box_rows = frame.dropna(subset=["x_min"])
    assert sum(len(r.boxes) for r in plan.records) == len(box_rows) == 36_096
    readers = {(b.reader, b.label) for r in plan.records for b in r.boxes}
    assert readers == set(zip(box_rows["rad_id"], box_rows["class_name"]))


def test_real_votes_and_consensus_match_the_csv(real_plan) -> None:
    plan, frame = real_plan
    calls = frame.drop_duplicates(["image_id", "rad_id", "class_name"])
    votes = calls.groupby(["image_id", "class_name"]).size()
    readers = frame.groupby("image_id")["rad_id"].nunique()
    by_key = {r.key: r for r in plan.records}
    for image_id in frame["image_id"].drop_duplicates().sample(300, random_state=0):
        record = by_key[f"vindr-{image_id}"]
        assert record.extras["readers"] == sorted(frame[frame.image_id == image_id].rad_id.unique())
        assert len(record.extras["readers"]) == readers[image_id] == 3
        expected_votes = votes[image_id].to_dict()
        assert record.extras["votes"] == expected_votes
        positive = {label for label, n in expected_votes.items() if n >= 2}  # 2 of 3 agree
        assert set(record.native_labels) == positive
        assert (record.labels["No Finding"] == 1) == ("No finding" in positive)
        # One reader of three is not a negative: -1 (they disagree), 0 only when nobody marked.
        for finding, label in (
            ("Cardiomegaly", "Cardiomegaly"),
            ("Pleural Effusion", "Pleural effusion"),
            ("Pneumothorax", "Pneumothorax"),
        ):
            marked = expected_votes.get(label, 0)
            assert record.labels[finding] == (1 if marked >= 2 else -1 if marked else 0), finding
        lesion = expected_votes.get("Nodule/Mass", 0)
        assert record.labels["Lung Lesion"] == (1 if lesion >= 2 else -1 if lesion else 0)
        # the Kaggle release has no Edema, Pneumonia or Fracture labels: blank, not 0
        assert record.labels["Edema"] is None and record.labels["Fracture"] is None
        assert record.labels["Support Devices"] is None
        assert {(c.reader, c.label) for c in record.reader_labels} == set(
            zip(
                calls[calls.image_id == image_id].rad_id,
                calls[calls.image_id == image_id].class_name,
            )
        )


def test_real_boxes_are_the_csv_rows_in_xywh(real_plan) -> None:
    plan, frame = real_plan
    record = next(r for r in plan.records if len(r.boxes) >= 5)
    rows = frame[(frame.image_id == record.key.removeprefix("vindr-")) & frame.x_min.notna()]
    expected = sorted(
        (r.rad_id, r.class_name, r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min)
        for r in rows.itertuples()
    )
    got = sorted((b.reader, b.label, b.x, b.y, b.width, b.height) for b in record.boxes)
    assert got == expected
    assert all(b.frame is None for b in record.boxes)  # original DICOM pixels


# --- the miniature, both layouts --------------------------------------------------------------


def test_layouts_are_detected_and_agree(kaggle_root: Path, physionet_root: Path) -> None:
    kaggle, physionet = plan_source("vindr", kaggle_root), plan_source("vindr", physionet_root)
    assert [r.key for r in kaggle.records] == [r.key for r in physionet.records]
    assert (
        kaggle.summary()["by_split"] == physionet.summary()["by_split"] == {"test": 2, "train": 8}
    )
    for a, b in zip(kaggle.records, physionet.records):
        if a.split == "train":
            assert a.native_labels == b.native_labels
            assert a.extras == b.extras
            assert sorted(a.boxes, key=repr) == sorted(b.boxes, key=repr)
            for finding in FINDINGS:  # PhysioNet also annotates Edema, Pneumonia, Fracture
                if finding in ("Edema", "Pneumonia", "Fracture"):
                    assert a.labels[finding] is None and b.labels[finding] == 0
                else:
                    assert a.labels[finding] == b.labels[finding]
        else:  # Kaggle test images carry no labels; PhysioNet's carry a consensus row
            assert set(a.labels.values()) == {None} and not a.reader_labels
            assert b.labels["No Finding"] == 1 and b.extras["readers"] == ["consensus"]


def test_physionet_test_spelling_is_normalised(physionet_root: Path) -> None:
    header = (physionet_root / "annotations" / "image_labels_test.csv").read_text().split("\n")[0]
    assert "Other disease," in header + ","  # the release's own spelling in the test file
    plan = plan_source("vindr", physionet_root)
    assert plan.warnings == []


def test_boxes_go_through_the_same_crop_as_the_image(kaggle_root: Path, kaggle_build: Path):
    boxes = load_manifest(kaggle_build, "bboxes", ["vindr"])
    images = load_manifest(kaggle_build, "images", ["vindr"]).set_index("key")
    plan = {r.key: r for r in plan_source("vindr", kaggle_root).records}
    source_boxes = sum(len(r.boxes) for r in plan.values())
    assert len(boxes) + int(images["boxes_outside"].sum()) == source_boxes
    assert int(images["boxes_outside"].sum()) == 1  # the box in the strip the crop removes
    assert boxes["clipped"].sum() == 1  # the box across the crop's bottom edge
    build = json.loads((kaggle_build / "build.json").read_text())["sources"]["vindr"]
    assert build["boxes_outside_crop"] == 1 and build["boxes"] == len(boxes)
    for row in boxes.itertuples():
        image = images.loc[row.key]
        crop = crop_box_for(int(image.orig_width), int(image.orig_height), 1024)
        assert (image.orig_width, image.orig_height) == (320, 400)  # portrait: top/bottom cut
        scale = 1024 / 320
        x0 = max((row.orig_x - crop.x0) * scale, 0)
        y0 = max((row.orig_y - crop.y0) * scale, 0)
        y1 = min((row.orig_y + row.orig_height - crop.y0) * scale, 1024)
        assert row.x == pytest.approx(x0) and row.y == pytest.approx(y0)
        assert row.y + row.height == pytest.approx(y1)
        assert row.reader and row.reader.startswith("R")
    reader_rows = load_manifest(kaggle_build, "reader_labels", ["vindr"])
    assert len(reader_rows) == sum(len(r.reader_labels) for r in plan.values())


def test_monochrome1_images_are_not_negatives(kaggle_build: Path) -> None:
    """The miniature stores some images inverted as MONOCHROME1: after decoding, their mean
    brightness is that of the MONOCHROME2 ones (a dark background), not its complement."""
    import io
    import tarfile

    from PIL import Image

    images = load_manifest(kaggle_build, "images", ["vindr"])
    means = {}
    for row in images.itertuples():
        with tarfile.open(kaggle_build / row.shard) as tar:
            data = tar.extractfile(row.member).read()
        photometric = json.loads(row.extras)["dicom"]["photometric_interpretation"]
        means[row.key] = (photometric, float(np.asarray(Image.open(io.BytesIO(data))).mean()))
    m1 = [m for p, m in means.values() if p == "MONOCHROME1"]
    m2 = [m for p, m in means.values() if p == "MONOCHROME2"]
    assert m1 and m2
    assert abs(np.mean(m1) - np.mean(m2)) < 25


def test_header_sex_and_age_reach_the_manifest(kaggle_build: Path) -> None:
    images = load_manifest(kaggle_build, "images", ["vindr"])
    assert set(images["sex"].dropna()) == {"M", "F"}
    assert images["age"].notna().sum() >= 3
    bits_stated = {json.loads(e)["dicom"]["bits_stored"] for e in images["extras"]}
    assert bits_stated == {8, 12}  # the header's claim, kept as stated...
    assert set(images["bits"]) == {12}  # ...while the pixels' real depth decides the mapping


# --- bad input ---------------------------------------------------------------------------------


def test_malformed_box_rows_are_skipped_and_reported(kaggle_root: Path, tmp_path: Path) -> None:
    root = _copy(kaggle_root, tmp_path)
    csv = root / "train.csv"
    lines = csv.read_text().splitlines()
    image_id = lines[1].split(",")[0]
    lines += [
        f"{image_id},Cardiomegaly,3,R99,abc,1.0,2.0,3.0",
        f"{image_id},Cardiomegaly,3,R99,50.0,60.0,40.0,70.0",  # x_max < x_min
    ]
    csv.write_text("\n".join(lines) + "\n")
    plan = plan_source("vindr", root)
    assert plan.skipped["malformed_box_row"] == 2
    assert any(f"row {len(lines) - 1}" in w for w in plan.warnings)
    assert (
        "R99"
        in plan.records[[r.key for r in plan.records].index(f"vindr-{image_id}")].extras["readers"]
    )


def test_unknown_class_and_bad_label_cells_name_the_place(
    kaggle_root: Path, physionet_root: Path, tmp_path: Path
) -> None:
    root = _copy(kaggle_root, tmp_path / "k")
    with (root / "train.csv").open("a") as handle:
        handle.write("abc,Dragon scale,99,R1,,,,\n")
    with pytest.raises(MetadataError, match="Dragon scale"):
        plan_source("vindr", root)
    root = _copy(physionet_root, tmp_path / "p")
    labels = root / "annotations" / "image_labels_train.csv"
    lines = labels.read_text().splitlines()
    cells = lines[3].split(",")
    cells[5] = "2"  # image_id, rad_id, Aortic enlargement, Atelectasis, Calcification, Cardiomegaly
    lines[3] = ",".join(cells)
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"row 4: column 'Cardiomegaly' is '2'"):
        plan_source("vindr", root)


def test_blank_physionet_label_cells_read_as_not_marked(physionet_root: Path, tmp_path: Path):
    clean = plan_source("vindr", physionet_root)
    root = _copy(physionet_root, tmp_path)
    labels = root / "annotations" / "image_labels_train.csv"
    lines = labels.read_text().splitlines()
    header = lines[0].split(",")
    marked = [
        (row, col)
        for row, line in enumerate(lines[1:], 1)
        for col, cell in enumerate(line.split(","))
        if col >= 2 and cell.strip() in ("1", "1.0")
    ]
    row, col = marked[0]
    cells = lines[row].split(",")
    image_id, reader, cells[col] = cells[0], cells[1], ""
    lines[row] = ",".join(cells)
    labels.write_text("\n".join(lines) + "\n")
    plan = plan_source("vindr", root)
    assert [r.key for r in plan.records] == [r.key for r in clean.records]
    assert any(
        f"1 blank label cells (first: row {row + 1}, column {header[col]!r})" in w
        for w in plan.warnings
    )
    before, after = (
        next(r for r in p.records if r.key == f"vindr-{image_id}") for p in (clean, plan)
    )
    calls = [{(c.reader, c.label) for c in r.reader_labels} for r in (before, after)]
    assert calls[0] - calls[1] == {(reader, header[col])}
    assert before.extras["votes"][header[col]] == after.extras["votes"].get(header[col], 0) + 1


def test_missing_undecodable_and_multiframe_files_become_failures(
    kaggle_root: Path, tmp_path: Path
) -> None:
    root = _copy(kaggle_root, tmp_path)
    train = sorted((root / "train").iterdir())
    train[0].unlink()
    train[1].write_bytes(b"DICM? no: " + bytes(300))
    frames = np.zeros((3, 40, 40), dtype=np.uint16)
    write_dicom(train[2], frames[0], extra={"NumberOfFrames": 3})
    from pydicom import dcmread

    dataset = dcmread(train[2])
    dataset.PixelData = frames.tobytes()
    dataset.save_as(train[2], enforce_file_format=True)
    out = tmp_path / "out"
    result = build_source("vindr", root, out, BuildOptions(workers=1, max_failure_rate=1.0))
    failures = load_manifest(out, "failures", ["vindr"]).set_index("key")
    assert result.failed == 3 and result.built == 7
    by_file = {Path(k).name: v for k, v in zip(failures.source_key, failures.message)}
    assert "is not on disk" in by_file[train[0].name]
    assert "DICOM" in by_file[train[1].name]
    assert "multi-frame DICOM (3 frames)" in by_file[train[2].name]


def test_no_header_value_outside_the_allow_list_reaches_any_output(
    kaggle_root: Path, tmp_path: Path
) -> None:
    root = _copy(kaggle_root, tmp_path)
    probes = {
        "PatientName": "Leakprobe^Nameplant",
        "InstitutionName": "Leakprobe Institution Plant",
        "ReferringPhysicianName": "Leakprobe^Doctor",
        "StationName": "LEAKSTATION",
        "PatientID": "LEAKPATIENTID",
        "AccessionNumber": "LEAKACCESSION",
    }
    for index, path in enumerate(sorted((root / "train").iterdir())):
        pixels = np.full((300 + index, 280), 1000 + index, dtype=np.uint16)
        write_dicom(path, pixels, sex="F", age="061Y", extra=probes)
    out = tmp_path / "out"
    build_source("vindr", root, out, BuildOptions(workers=1, pixels=PixelOptions()))
    needles = [v.lower().encode() for v in probes.values()] + [b"leakprobe"]
    needles += [n.decode().encode("utf-16-le") for n in needles]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in files) and any(p.suffix == ".parquet" for p in files)
    for path in files:
        data = path.read_bytes()
        for blob in (data, _maybe_gunzip(data)):
            lowered = blob.lower()
            for needle in needles:
                assert needle not in lowered, f"{needle!r} leaked into {path}"
    images = load_manifest(out, "images", ["vindr"])
    assert set(images[images.split == "train"]["sex"]) == {"F"}  # allow-listed: it does pass


def _maybe_gunzip(data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError):
        return b""


def test_kaggle_header_is_the_real_one(real_metadata: Path) -> None:
    with gzip.open(real_metadata / "vinbigdata-train.csv.gz", "rt") as handle:
        assert handle.readline().strip() == KAGGLE_HEADER


def test_real_rows_build_with_their_boxes(real_metadata: Path, tmp_path: Path) -> None:
    """Real train.csv rows of two images with boxes, DICOMs of a real-release size written
    under them: every real box comes out, in its original coordinates and its reader's name."""
    frame = pd.read_csv(real_metadata / "vinbigdata-train.csv.gz", dtype=str, keep_default_na=False)
    boxed = frame[frame.x_min != ""]
    ids = sorted(boxed.image_id.unique())[:2]
    rows = frame[frame.image_id.isin(ids)]
    root = tmp_path / "vinbigdata"
    root.mkdir()
    rows.to_csv(root / "train.csv", index=False)
    crops = {}
    for image_id in ids:  # portrait, large enough for every box of the image
        mine = boxed[boxed.image_id == image_id]
        width = max(2400, int(mine.x_max.astype(float).max()) + 1)
        height = max(width + 400, int(mine.y_max.astype(float).max()) + 1)
        write_dicom(root / "train" / f"{image_id}.dicom", np.full((height, width), 900, np.uint16))
        crops[image_id] = crop_box_for(width, height, 1024)
    out = tmp_path / "out"
    result = build_source("vindr", root, out, BuildOptions(workers=1))
    assert result.built == 2 and result.failed == 0
    boxes = load_manifest(out, "bboxes", ["vindr"])
    mine = boxed[boxed.image_id.isin(ids)]
    inside = [
        r
        for r in mine.itertuples()
        if float(r.y_max) > crops[r.image_id].y0 and float(r.y_min) < crops[r.image_id].y1
    ]
    assert result.boxes_outside == len(mine) - len(inside)
    expected = sorted((r.rad_id, r.class_name, float(r.x_min), float(r.y_min)) for r in inside)
    got = sorted((r.reader, r.label, r.orig_x, r.orig_y) for r in boxes.itertuples())
    assert got == expected


def test_chexpert_and_vinbigdata_side_by_side(
    kaggle_root: Path, sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    """Both releases identify themselves by a train.csv: the header tells them apart."""
    shutil.copytree(kaggle_root, tmp_path / kaggle_root.name)
    chexpert = sample_roots_pristine["chexpert"]
    shutil.copytree(chexpert, tmp_path / chexpert.name)
    assert plan_source("vindr", tmp_path).root == (tmp_path / kaggle_root.name).resolve()
    assert plan_source("chexpert", tmp_path).root == (tmp_path / chexpert.name).resolve()
