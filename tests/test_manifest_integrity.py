"""Damaged or outdated manifests and members: ``verify`` reports them, readers refuse them
with a message naming the file, ``export-index`` stops cleanly, ``stats`` reads no report text.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import MaCheX, load_manifest
from machex.build import BuildOptions, build_source
from machex.export import ExportError, export_index
from machex.manifests import (
    TABLES,
    ManifestError,
    SchemaMismatch,
    fragment_path,
    write_fragment,
)
from machex.paper import CollectionCounts
from machex.sample import make_sample
from machex.shardwork import is_shard_done
from machex.stats import collection_stats
from machex.verify import verify_collection

runner = CliRunner()
OPTIONS = BuildOptions(workers=1, shard_size=3)  # BRAX's 7 images in 3 shards


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_sample(tmp_path_factory.mktemp("integrity") / "sample", ["brax", "mimic"])


@pytest.fixture(scope="module")
def built(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("integrity-out") / "out"
    for name, root in roots.items():
        build_source(name, root, out, OPTIONS)
    return out


def problems(out: Path) -> list[tuple[str, str, str | None]]:
    return [(p.kind, p.shard, p.key) for p in verify_collection(out).problems]


def last_row(out: Path, source: str = "brax"):
    """The images row of the last sample of the source's first shard."""
    images = load_manifest(out, "images", source)
    shard = sorted(images["shard"])[0]
    return images[images["shard"] == shard].sort_values("offset").iloc[-1]


def json_member(out: Path, row) -> tarfile.TarInfo:
    with tarfile.open(out / row["shard"]) as tar:
        return tar.getmember(f"{row['key']}.json")


def fragment(out: Path, table: str, source: str = "brax") -> Path:
    stem = Path(sorted(load_manifest(out, "images", source)["shard"])[0]).stem
    return fragment_path(out, table, source, stem)


# -- <key>.json members ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["not_json", "other_key"])
def test_verify_reads_each_json_member(copy: Path, damage: str) -> None:
    """Bytes of a JSON member overwritten: the dataset's ``read_json`` fails on it in
    training, so verify must not call the collection ok."""
    row = last_row(copy)
    info = json_member(copy, row)
    with open(copy / row["shard"], "r+b") as handle:
        handle.seek(info.offset_data)
        data = handle.read(info.size)
        if damage == "not_json":
            changed = b"XXXX" + data[4:]
        else:  # still JSON, same length, but another key
            changed = data.replace(row["key"].encode(), row["key"][:-1].encode() + b"#")
        assert len(changed) == len(data) and changed != data
        handle.seek(info.offset_data)
        handle.write(changed)
    assert problems(copy) == [("bad_json", row["shard"], row["key"])]
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert row["shard"] in result.stdout and row["key"] in result.stdout


def test_verify_wants_the_json_right_after_its_image(copy: Path) -> None:
    """``MaCheX.read_json`` reads the header that follows the image member: a member put
    between them breaks it."""
    row = last_row(copy)
    rewritten = io.BytesIO()
    with (
        tarfile.open(copy / row["shard"]) as src,
        tarfile.open(fileobj=rewritten, mode="w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for info in src:
            if info.name == f"{row['key']}.json":
                stray = tarfile.TarInfo("stray.txt")
                stray.size = 5
                dst.addfile(stray, io.BytesIO(b"hello"))
            dst.addfile(info, src.extractfile(info))
    (copy / row["shard"]).write_bytes(rewritten.getvalue())
    dataset = MaCheX(copy, splits=None)
    with pytest.raises(OSError, match="stray.txt"):
        dataset.read_json(list(dataset.manifest["key"]).index(row["key"]))
    assert problems(copy) == [
        ("misplaced_json", row["shard"], row["key"]),
        ("extra_member", row["shard"], None),
    ]


# -- fragments: unreadable, missing, disagreeing ---------------------------------------------


@pytest.mark.parametrize("table", ["images", "labels"])
def test_verify_reports_a_truncated_fragment(copy: Path, table: str) -> None:
    path = fragment(copy, table)
    rel = path.relative_to(copy).as_posix()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = verify_collection(copy)  # no ArrowInvalid traceback
    assert ("unreadable_fragment", rel, None) in problems(copy)
    assert not report.ok
    result = runner.invoke(app, ["verify", str(copy), "--json"])
    assert result.exit_code == 1 and rel in result.stdout
    with pytest.raises(ValueError, match=rel.split("/")[-1]) as raised:
        load_manifest(copy, table)
    assert "machex build again" in str(raised.value)


def test_verify_reports_a_deleted_labels_fragment_and_a_resume_restores_it(
    copy: Path, roots: dict[str, Path]
) -> None:
    """Without its labels fragment a shard's images would read as all-NaN labels."""
    path = fragment(copy, "labels")
    original = path.read_bytes()
    path.unlink()
    assert problems(copy) == [("missing_fragment", path.relative_to(copy).as_posix(), None)]
    assert not is_shard_done(copy, "brax", path.stem)
    build_source("brax", roots["brax"], copy, OPTIONS)  # the same command again
    assert path.read_bytes() == original
    assert verify_collection(copy).ok


def test_verify_compares_labels_keys_with_images_keys(copy: Path) -> None:
    path = fragment(copy, "labels")
    rows = pq.read_table(path).to_pylist()
    write_fragment(path, "labels", rows[1:])
    assert problems(copy) == [
        ("labels_mismatch", path.relative_to(copy).as_posix(), rows[0]["key"])
    ]


def test_verify_reports_fragments_of_a_shard_without_images_fragment(copy: Path) -> None:
    path = fragment(copy, "images")
    path.unlink()
    found = problems(copy)
    assert {kind for kind, _, _ in found} == {"orphan_fragment", "unlisted_shard"}
    labels = fragment_path(copy, "labels", "brax", path.stem).relative_to(copy).as_posix()
    assert ("orphan_fragment", labels, None) in found


# -- schema version --------------------------------------------------------------------------


def test_an_old_schema_fragment_is_refused_not_read_as_nulls(copy: Path) -> None:
    """A schema-1 images fragment (no ``boxes_outside``) and a schema-1 reports fragment
    (``key, report``) would read as null columns."""
    images = fragment(copy, "images")
    pq.write_table(pq.read_table(images).drop_columns(["boxes_outside"]), images)
    with pytest.raises(SchemaMismatch, match="boxes_outside") as raised:
        load_manifest(copy, "images")
    message = str(raised.value)
    assert str(images) in message and "--source brax" in message and "--overwrite" in message
    with pytest.raises(SchemaMismatch):
        MaCheX(copy, splits=None)
    assert ("schema_mismatch", images.relative_to(copy).as_posix(), None) in problems(copy)
    reports = next((copy / "manifests" / "reports" / "source=mimic").glob("*.parquet"))
    pq.write_table(pa.table({"key": ["k"], "report": ["text"]}), reports)
    with pytest.raises(SchemaMismatch, match="--source mimic"):
        load_manifest(copy, "reports", "mimic")


def test_a_source_built_under_another_schema_version_is_refused(copy: Path) -> None:
    build = json.loads((copy / "build.json").read_text())
    build["sources"]["brax"]["options"]["fingerprint"]["schema_version"] = 1
    (copy / "build.json").write_text(json.dumps(build))
    with pytest.raises(SchemaMismatch, match="source brax was built under manifest schema 1"):
        load_manifest(copy, "labels")
    assert len(load_manifest(copy, "labels", "mimic"))  # the other source still reads
    assert problems(copy) == [("schema_mismatch", "build.json", None)]
    result = runner.invoke(app, ["stats", str(copy)])
    assert result.exit_code == 2 and "rebuild that source" in result.stderr


# -- export-index ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["hash", "decode"])
def test_export_stops_on_a_damaged_member_naming_it(
    copy: Path, tmp_path: Path, damage: str
) -> None:
    target = tmp_path / "export"
    export_index(copy, target, ["brax"])
    index = target / "brax" / "index.json"
    assert index.is_file()
    row = last_row(copy)
    with open(copy / row["shard"], "r+b") as handle:  # the JPEG's header gone
        handle.seek(int(row["offset"]))
        handle.write(b"\0" * 64)
    if damage == "decode":  # bytes the manifest agrees with, that are no image
        path = fragment(copy, "images")
        rows = pq.read_table(path).to_pylist()
        data = (copy / row["shard"]).read_bytes()[row["offset"] : row["offset"] + row["size"]]
        for r in rows:
            if r["key"] == row["key"]:
                r["sha256"] = hashlib.sha256(data).hexdigest()
        write_fragment(path, "images", rows)
    with pytest.raises(ExportError) as raised:
        export_index(copy, target, ["brax"])
    message = str(raised.value)
    assert row["key"] in message and row["shard"] in message and "machex verify" in message
    assert not index.exists()  # no index describing the files of the earlier export
    result = runner.invoke(app, ["export-index", str(copy), "--to", str(tmp_path / "y")])
    assert result.exit_code == 2 and row["key"] in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


# -- reading only the columns needed ---------------------------------------------------------


def test_load_manifest_reads_only_the_columns_asked(built: Path) -> None:
    frame = load_manifest(built, "reports", columns=["study_id"])
    assert list(frame.columns) == ["study_id", "source"]
    assert len(frame) == len(load_manifest(built, "reports")) > 0
    assert list(load_manifest(built, "reports", columns=[]).columns) == ["source"]
    assert list(load_manifest(built, "reader_labels", "brax", columns=["key"]).columns) == [
        "key",
        "source",
    ]
    with pytest.raises(ValueError, match="no column"):
        load_manifest(built, "reports", columns=["report"])
    # A wrong filter is the caller's error, not a damaged fragment to delete and rebuild.
    for filters, message in (
        ([("nonexistent", "==", "x")], "name no column"),
        ([("source", "==", "mimic")], "sources="),
        ([("age", "==", "abc")], "images filters"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            load_manifest(built, "images", filters=filters)
        assert not isinstance(error.value, ManifestError) and "delete it" not in str(error.value)
    english = load_manifest(built, "reports", filters=[[("language", "==", "en")]])
    assert len(english) == (load_manifest(built, "reports")["language"] == "en").sum()


def test_unknown_columns_and_filter_columns_are_named_with_the_table_columns(
    built: Path,
) -> None:
    reports, images = TABLES["reports"].names, TABLES["images"].names
    with pytest.raises(ValueError) as error:  # in the order given; `source` is the partition's
        load_manifest(built, "reports", columns=["source", "text", "report", "lang", "report"])
    assert str(error.value) == (
        f"reports has no column ['report', 'lang', 'report']; its columns: {reports}"
    )
    with pytest.raises(ValueError) as error:  # sorted, once each
        load_manifest(
            built,
            "images",
            filters=[[("zz", "==", 1), ("key", "==", "k")], [("aa", "==", 2), ("zz", ">", 0)]],
        )
    assert str(error.value) == f"images filters name no column ['aa', 'zz']; its columns: {images}"


def test_stats_and_paper_counts_load_no_report_text(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = load_manifest(built, "reports")
    expected_reports = reports.groupby("source").size().to_dict()
    english = reports[(reports["text"].fillna("") != "") & (reports["language"] == "en")]
    images = load_manifest(built, "images")
    with_report = images.merge(english[["source", "study_id"]], on=["source", "study_id"])
    reads: list[tuple[str, object]] = []
    original = pq.read_table

    def spy(path, *args, columns=None, **kwargs):
        reads.append((Path(path).parent.parent.name, columns))
        return original(path, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    stats = collection_stats(built)
    counts = CollectionCounts.from_manifests(built)
    texts = {"text", "findings", "impression", "findings_impression", "text_v1"}
    report_reads = [columns for table, columns in reads if table == "reports"]
    assert report_reads and all(c is not None and not texts & set(c) for c in report_reads)
    assert stats["reports"] == expected_reports
    assert counts.reports == with_report.groupby("source").size().to_dict() != {}
