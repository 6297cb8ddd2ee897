"""End-to-end builds of the embedded sample: shards, manifests, determinism, resume after
kill -9, failures, and the CLI's exit codes."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image
from test_imaging import bomb_png
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import load_manifest
from machex.build import (
    BuildError,
    BuildOptions,
    build_source,
    failed_shards,
    plan_source,
    read_build_file,
    shard_specs,
)
from machex.imaging import Encoding, PixelOptions
from machex.manifests import SCHEMA_VERSION, TABLES
from machex.records import FINDINGS
from machex.shards import ShardWriter, read_member

runner = CliRunner()
SOURCES = ("chestxray14", "chexpert")


def chexpert_args(root: Path, out: Path, *extra: str) -> list[str]:
    """``machex build`` arguments for the CheXpert sample."""
    return ["build", "-s", "chexpert", "--root", str(root), "--out", str(out), *extra]


def build_all(roots: dict[str, Path], out: Path, **options) -> None:
    for source in SOURCES:
        build_source(source, roots[source], out, BuildOptions(**options))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    out = tmp_path_factory.mktemp("built")
    build_all(sample_roots_pristine, out, workers=1, shard_size=7)
    return out


def snapshot(out: Path) -> dict[str, object]:
    """Everything a build produces except build.json's timestamps: shard bytes and tables."""
    shards = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("shards/*/*"))}
    tables = {}
    for table in TABLES:
        frame = load_manifest(out, table)
        by = ["source", "study_id"] if table == "reports" else ["key"]  # reports: per study
        tables[table] = frame.sort_values(by, kind="stable").reset_index(drop=True)
    return {"shards": shards, "tables": tables}


def assert_same_build(a: Path, b: Path) -> None:
    first, second = snapshot(a), snapshot(b)
    assert first["shards"].keys() == second["shards"].keys()
    for name in first["shards"]:
        assert first["shards"][name] == second["shards"][name], name
    for table in TABLES:
        pd.testing.assert_frame_equal(first["tables"][table], second["tables"][table])


def test_manifests_point_at_the_right_bytes(built: Path) -> None:
    images = load_manifest(built, "images")
    assert len(images) == images["key"].nunique() > 0
    for row in images.itertuples():
        data = read_member(built / row.shard, row.offset, row.size)
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (1024, 1024) and image.mode == "L"
        assert row.member == f"{row.key}.jpg"
        assert Path(row.shard).name.startswith(f"{row.source}-{row.split}-")


def test_shards_are_webdataset_with_json_metadata(built: Path) -> None:
    images = load_manifest(built, "images").set_index("key")
    labels = load_manifest(built, "labels").set_index("key")
    seen = 0
    for shard in sorted(built.glob("shards/*/*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            key = sample["__key__"]
            assert meta["key"] == key and "." not in key
            row = images.loc[key]
            assert hashlib.sha256(sample["jpg"]).hexdigest() == row["sha256"]
            assert (meta["split"], meta["view"], meta["source"]) == (
                row["split"],
                row["view"],
                row["source"],
            )
            for finding in FINDINGS:
                value = labels.loc[key, finding]
                assert meta["labels"][finding] == (None if pd.isna(value) else int(value))
            seen += 1
    assert seen == len(images)


def test_sample_counts_and_splits(built: Path, sample_roots_pristine) -> None:
    images = load_manifest(built, "images")
    counts = images.groupby(["source", "split"]).size().to_dict()
    nih = sample_roots_pristine["chestxray14"]
    n_test = len((nih / "test_list.txt").read_text().split())
    n_train = len((nih / "train_val_list.txt").read_text().split())
    assert counts[("chestxray14", "train")] == n_train
    assert counts[("chestxray14", "test")] == n_test
    chexpert = pd.read_csv(sample_roots_pristine["chexpert"] / "train.csv")
    assert counts[("chexpert", "train")] == (chexpert["Frontal/Lateral"] == "Frontal").sum()
    assert set(images[images.source == "chexpert"]["view"]) <= {"AP", "PA", "LL", "RL"}
    # shard_size=7: shards hold at most 7 samples and are numbered per split.
    assert images.groupby("shard").size().max() <= 7
    info = read_build_file(built)
    assert info["sources"]["chexpert"]["status"] == "complete"
    assert info["sources"]["chexpert"]["skipped"]["lateral"] > 0
    assert info["schema_version"] == SCHEMA_VERSION


def test_nih_boxes_map_through_a_downscaled_copy(sample_roots, tmp_path: Path) -> None:
    """NIH boxes are in the 1024 frame; a copy downscaled to 512 (like the real files in
    ../shared) must still give the same output-frame boxes, since the output is 1024 again."""
    root = sample_roots["chestxray14"]
    for png in root.glob("images_*/images/*.png"):
        with Image.open(png) as image:
            image.resize((512, 512), Image.Resampling.LANCZOS).save(png)
    out = tmp_path / "out"
    build_source("nih", root, out, BuildOptions(workers=1))
    boxes = load_manifest(out, "bboxes")
    csv = pd.read_csv(root / "BBox_List_2017.csv", header=None, skiprows=1, usecols=range(6))
    assert len(boxes) == len(csv) > 0
    assert set(boxes["finding"]) <= set(FINDINGS)
    for row in boxes.itertuples():
        assert (row.frame_width, row.frame_height) == (1024, 1024)
        assert (row.x, row.y, row.width, row.height) == pytest.approx(
            (row.orig_x, row.orig_y, row.orig_width, row.orig_height), abs=1e-6
        )
    images = load_manifest(out, "images")
    assert set(images["orig_width"]) == {512}


def test_same_bytes_whatever_the_worker_count(sample_roots_pristine, built, tmp_path) -> None:
    out = tmp_path / "two-workers"
    build_all(sample_roots_pristine, out, workers=2, shard_size=7)
    assert_same_build(built, out)


def test_rerun_of_a_finished_build_does_nothing(built: Path, sample_roots_pristine) -> None:
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*.tar")}
    result = runner.invoke(
        app,
        [
            "build",
            "--source",
            "chexpert",
            "--root",
            str(sample_roots_pristine["chexpert"]),
            "--out",
            str(built),
            "--shard-size",
            "7",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert before == {p: p.stat().st_mtime_ns for p in built.rglob("*.tar")}


def test_changed_options_need_overwrite(built: Path, sample_roots_pristine, tmp_path) -> None:
    out = tmp_path / "copy"
    build_source(
        "chexpert", sample_roots_pristine["chexpert"], out, BuildOptions(workers=1, shard_size=7)
    )
    args = [
        "build",
        "-s",
        "chexpert",
        "--root",
        str(sample_roots_pristine["chexpert"]),
        "--out",
        str(out),
        "--workers",
        "1",
        "--encoding",
        "png",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    changed = "(encoding: jpeg -> png, shard_size: 7 -> 1000)"  # what changed, nothing else
    assert changed in result.output
    # A --part run cannot take --overwrite: the advice must work there.
    result = runner.invoke(app, [*args, "--part", "0/2"])
    assert result.exit_code == 2
    assert changed in result.output and "new --out" in result.output
    assert "add --overwrite" not in result.output
    result = runner.invoke(app, [*args, "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["sources"]["chexpert"]["status"] == "built"
    images = load_manifest(out, "images")
    assert set(images["encoding"]) == {"png"} and images["member"].str.endswith(".png").all()


def test_png16_keeps_sixteen_bits(sample_roots, tmp_path: Path) -> None:
    """A 12-bit image in a 16-bit PNG (PadChest-style) dropped into the NIH sample."""
    root = sample_roots["chestxray14"]
    target = sorted(root.glob("images_*/images/*.png"))[0]
    ramp = (np.arange(1024 * 1024, dtype=np.uint32) % 4096).astype(np.uint16).reshape(1024, 1024)
    Image.frombytes("I;16", (1024, 1024), ramp.astype("<u2").tobytes()).save(target)
    out = tmp_path / "out"
    build_source("nih", root, out, BuildOptions(PixelOptions(encoding=Encoding.png16), workers=1))
    images = load_manifest(out, "images").set_index("source_key")
    row = images.loc[f"images/{target.name}"]
    assert row["bits"] == 12
    data = read_member(out / row["shard"], row["offset"], row["size"])
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    assert pixels.max() == 65535 and len(np.unique(pixels)) == 4096


def damage(root: Path) -> dict[str, str]:
    """Break three NIH images in three ways; returns source_key -> expected error type."""
    images = sorted(root.glob("images_*/images/*.png"))
    truncated, missing, bomb = images[0], images[1], images[2]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    missing.unlink()
    bomb.write_bytes(bomb_png(100_000, 100_000))
    return {
        f"images/{truncated.name}": "ImageDecodeError",
        f"images/{missing.name}": "FileNotFoundError",
        f"images/{bomb.name}": "DecompressionBombError",
    }


def test_bad_files_are_recorded_and_the_build_goes_on(sample_roots, tmp_path: Path) -> None:
    root = sample_roots["chestxray14"]
    expected = damage(root)
    out = tmp_path / "out"
    args = ["build", "-s", "nih", "--root", str(root), "--out", str(out), "-j", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1  # 3 of 25 failed: above the default 1%
    assert "above --max-failure-rate" in result.output
    failures = load_manifest(out, "failures").set_index("source_key")
    assert failures["error_type"].to_dict() == expected
    images = load_manifest(out, "images")
    total = len(plan_keys(root))
    assert len(images) == total - 3
    # The same build with a tolerant gate passes and builds nothing new.
    result = runner.invoke(app, [*args, "--max-failure-rate", "0.2"])
    assert result.exit_code == 0, result.output


def test_retry_failed_rebuilds_only_the_shards_with_failures(
    sample_roots, sample_roots_pristine, tmp_path: Path
) -> None:
    root, pristine = sample_roots["chestxray14"], sample_roots_pristine["chestxray14"]
    damaged = damage(root)  # truncated, missing, a decompression bomb
    out = tmp_path / "out"
    args = ["build", "-s", "nih", "--root", str(root), "--out", str(out), "-j", "1"]
    args += ["--shard-size", "7", "--max-failure-rate", "1"]
    assert runner.invoke(app, args).exit_code == 0
    failed = failed_shards(out, "chestxray14")
    assert 1 <= len(failed) <= 3
    tars = sorted((out / "shards" / "chestxray14").glob("*.tar"))
    kept = {p.name: p.stat().st_mtime_ns for p in tars if p.stem not in failed}
    assert kept
    for source_key in damaged:  # the user downloads the three files again
        (original,) = pristine.glob(f"images_*/{source_key}")
        shutil.copyfile(original, root / original.relative_to(pristine))

    # A plain re-run: the now present file changed the plan, inside a failed shard only.
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "file missing -> on disk" in result.output, result.output
    assert "add --retry-failed" in result.output
    # Refused beside --overwrite and --part.
    for extra in (["--overwrite"], ["--part", "0/2"]):
        result = runner.invoke(app, [*args, "--retry-failed", *extra])
        assert result.exit_code == 2 and "cannot be combined" in result.output, result.output

    result = runner.invoke(app, [*args, "--retry-failed", "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)["sources"]["chestxray14"]
    assert (counts["failed"], counts["shards_written"]) == (0, len(failed))
    assert len(load_manifest(out, "failures")) == 0
    for name, stamp in kept.items():  # the other shards were not touched
        assert (out / "shards" / "chestxray14" / name).stat().st_mtime_ns == stamp
    fresh = tmp_path / "fresh"
    build_source("nih", root, fresh, BuildOptions(workers=1, shard_size=7))
    assert_same_build(out, fresh)
    assert read_build_file(out)["sources"]["chestxray14"]["status"] == "complete"
    # Nothing failed any more: a second retry has nothing to do.
    result = runner.invoke(app, [*args, "--retry-failed"])
    assert result.exit_code == 0 and "already complete" in result.output, result.output


def test_retry_failed_killed_midway_and_builds_from_before_shard_hashes(
    sample_roots, sample_roots_pristine, tmp_path: Path, monkeypatch
) -> None:
    root, pristine = sample_roots["chestxray14"], sample_roots_pristine["chestxray14"]
    missing = next(k for k, error in damage(root).items() if error == "FileNotFoundError")
    out = tmp_path / "out"
    args = ["build", "-s", "nih", "--root", str(root), "--out", str(out), "-j", "1"]
    args += ["--shard-size", "7", "--max-failure-rate", "1"]
    assert runner.invoke(app, args).exit_code == 0
    (original,) = pristine.glob(f"images_*/{missing}")
    shutil.copyfile(original, root / original.relative_to(pristine))  # downloaded again

    # A build.json written before per-shard hashes: a retry cannot tell what changed, and
    # says so; a plain run of a complete build records the hashes.
    def entry() -> dict:
        return read_build_file(out)["sources"]["chestxray14"]

    data = read_build_file(out)
    hashes = data["sources"]["chestxray14"].pop("shard_fingerprints")
    (out / "build.json").write_text(json.dumps(data))
    result = runner.invoke(app, [*args, "--retry-failed"])
    assert result.exit_code == 2 and "cannot tell which shards changed" in result.output
    (moved := root / original.relative_to(pristine)).rename(moved.with_suffix(".away"))
    assert runner.invoke(app, args).exit_code == 0  # the files as they were: up to date
    assert entry()["shard_fingerprints"] == hashes
    moved.with_suffix(".away").rename(moved)

    # A retry killed after marking its first shard undone, before build.json takes the new
    # plan: a plain re-run still sees the old plan, and points at --retry-failed again.
    import machex.build as build_module

    options = BuildOptions(workers=1, shard_size=1, max_failure_rate=1)
    build_source("nih", root, out, options, overwrite=True)  # one shard per image
    (moved := root / original.relative_to(pristine)).rename(moved.with_suffix(".away"))
    build_source("nih", root, out, options, overwrite=True)  # the file missing again
    moved.with_suffix(".away").rename(moved)
    old_plan, calls = entry()["plan_fingerprint"], []
    assert len(failed_shards(out, "chestxray14")) == 3
    real = build_module.fragment_path

    def killed_at_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(build_module, "fragment_path", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        build_source("nih", root, out, options, retry_failed=True)
    monkeypatch.setattr(build_module, "fragment_path", real)
    assert entry()["plan_fingerprint"] == old_plan
    assert entry()["status"] == "in_progress"  # not "complete" with a shard taken apart
    args = [*args[:-4], "--shard-size", "1", "--max-failure-rate", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "add --retry-failed" in result.output, result.output
    result = runner.invoke(app, [*args, "--retry-failed", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sources"]["chestxray14"]["failed"] == 2  # the other two


def plan_keys(root: Path) -> list[str]:
    return [r.key for r in plan_source("nih", root).records]


def test_stale_partial_shard_is_never_visible(sample_roots_pristine, built, tmp_path) -> None:
    """A half-written .tmp shard and a tar without its manifest fragment (what a crash leaves)
    are redone; the result equals the uninterrupted build."""
    out = tmp_path / "crashed"
    build_all(sample_roots_pristine, out, workers=1, shard_size=7)
    victim = sorted(out.glob("shards/chexpert/*.tar"))[1]
    (victim.parent / (victim.name + ".tmp")).write_bytes(victim.read_bytes()[:3000])
    victim.write_bytes(victim.read_bytes()[:5000])  # a torn tar
    (out / "manifests/images/source=chexpert" / f"{victim.stem}.parquet").unlink()
    build_all(sample_roots_pristine, out, workers=1, shard_size=7)
    assert not list(out.rglob("*.tmp"))
    assert_same_build(built, out)


def test_abort_on_a_full_disk_keeps_the_first_error_and_removes_the_temporary(
    tmp_path: Path, monkeypatch
) -> None:
    """Closing the tar on a full disk fails again; that must not hide the error that made the
    writer abort, nor leave its .tmp file behind."""

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device (closing)")

    with (
        pytest.raises(OSError, match="the first error"),
        ShardWriter(tmp_path / "shard.tar") as writer,
    ):
        writer.add("a.txt", b"x" * 1000)
        monkeypatch.setattr(writer._tar, "close", disk_full)
        raise OSError(errno.ENOSPC, "the first error")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_build(sample_roots, tmp_path) -> None:
    """Kill -9 a real build (a subprocess) mid-way, run the same command again, compare."""
    root = sample_roots["chexpert"]
    for jpg in root.glob("*/*/*/*.jpg"):  # full-release sized images: slow enough to kill
        with Image.open(jpg) as image:
            image.convert("L").resize((2000, 2400)).save(jpg, quality=90)
    command = [sys.executable, "-m", "cli.machex_cli"] + chexpert_args(
        root, tmp_path / "killed", "-j", "1", "--shard-size", "2", "--quiet"
    )
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1])
    fragments = tmp_path / "killed/manifests/images/source=chexpert"
    deadline = time.monotonic() + 120
    while len(list(fragments.glob("*.parquet"))) < 2:
        assert process.poll() is None, "build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(fragments.glob("*.parquet")))
    total_shards = len(shard_specs(plan_source("chexpert", root), 2))
    assert 2 <= done < total_shards, "the kill must land mid-build"
    rerun = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    build_source("chexpert", root, tmp_path / "clean", BuildOptions(workers=1, shard_size=2))
    assert_same_build(tmp_path / "killed", tmp_path / "clean")


#: Runs the CLI with Python's Ctrl-C handler even where the test runner ignores SIGINT (a
#: background job of a non-interactive shell), which a child would otherwise inherit.
WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'machex'; from cli.machex_cli import main; main()"
)


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_build_exits_promptly_and_resumes(sample_roots, tmp_path):
    """Ctrl-C while joblib's workers run must end the build (exit 130), not hang waiting for
    the worker pool; the re-run finishes it as if it had never stopped."""
    root = sample_roots["chestxray14"]
    for png in root.glob("images_*/images/*.png"):  # full-size images: slow enough to stop
        with Image.open(png) as image:
            image.convert("L").resize((2000, 2400)).save(png)
    out = tmp_path / "stopped"
    args = ["build", "-s", "nih", "--root", str(root), "--out", str(out), "-j", "2"]
    command = [sys.executable, "-c", WITH_CTRL_C, *args, "--shard-size", "2", "--quiet"]
    process = subprocess.Popen(  # its own group: a hung build is killed with its workers
        command,
        cwd=Path(__file__).parents[1],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shards/chestxray14/*.tar")):
            assert process.poll() is None, "build ended before it could be interrupted"
            assert time.monotonic() < deadline, "no shard within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:  # it hung
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "are kept" in stderr and "run the same command" in stderr
    assert "Traceback" not in stderr, stderr
    rerun = subprocess.run(
        command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    build_source("nih", root, tmp_path / "clean", BuildOptions(workers=1, shard_size=2))
    assert_same_build(out, tmp_path / "clean")


def test_bad_options_and_another_root_exit_2(sample_roots_pristine, built, tmp_path) -> None:
    root = sample_roots_pristine["chexpert"]
    result = runner.invoke(app, chexpert_args(root, tmp_path / "o", "--workers", "0"))
    assert result.exit_code == 2 and "--workers" in result.output
    other = tmp_path / "elsewhere" / root.name
    shutil.copytree(root, other)
    result = runner.invoke(app, chexpert_args(other, built, "--shard-size", "7"))
    assert result.exit_code == 2 and "same --root" in result.output


def test_failure_rows_name_the_expected_path_and_all_failed_shards_have_no_tar(
    sample_roots, tmp_path: Path
) -> None:
    root = sample_roots["chexpert"]
    plan = plan_source("chexpert", root)
    val = [r for r in plan.records if r.split == "val"]
    for record in val:  # every val image goes missing: its shard has nothing to hold
        Path(record.path).unlink()
    out = tmp_path / "out"
    result = build_source("chexpert", root, out, BuildOptions(workers=1, max_failure_rate=1))
    assert result.failed == len(val)
    failures = load_manifest(out, "failures")
    assert sorted(failures["path"]) == sorted(str(root / r.source_key) for r in val)
    assert not list(out.glob("shards/chexpert/chexpert-val-*.tar"))
    assert (out / "manifests/images/source=chexpert/chexpert-val-000000.parquet").is_file()
    # ... and that still counts as done: a re-run has nothing to do.
    again = build_source("chexpert", root, out, BuildOptions(workers=1, max_failure_rate=1))
    assert again.status == "up_to_date"


def test_changed_metadata_content_is_not_resumed(sample_roots, tmp_path: Path) -> None:
    root = sample_roots["chestxray14"]
    out = tmp_path / "out"
    build_source("nih", root, out, BuildOptions(workers=1))
    entry = root / "Data_Entry_2017_v2020.csv"
    lines = entry.read_text().splitlines()
    cells = lines[1].split(",")
    age = int(cells[4])
    cells[4] = str(age + 1)  # one patient's age changes, the keys do not
    entry.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    result = runner.invoke(app, ["build", "-s", "nih", "--root", str(root), "--out", str(out)])
    assert result.exit_code == 2 and "changed" in result.output
    key = f"chestxray14-{Path(cells[0]).stem}"
    assert f"1 of the {len(lines) - 1} records" in result.output, result.output
    assert f"first {key}: age {age} -> {age + 1}" in result.output


def test_relative_and_absolute_roots_are_the_same_build(sample_roots, tmp_path, monkeypatch):
    root = sample_roots["chexpert"]
    out = tmp_path / "out"
    build_source("chexpert", root, out, BuildOptions(workers=1))
    monkeypatch.chdir(root.parent)
    again = build_source("chexpert", Path(root.name), out, BuildOptions(workers=1))
    assert again.status == "up_to_date"


def test_overwrite_repairs_a_broken_build_json(sample_roots_pristine, tmp_path) -> None:
    root = sample_roots_pristine["chexpert"]
    out = tmp_path / "out"
    build_source("chexpert", root, out, BuildOptions(workers=1))
    (out / "build.json").write_text("{broken")
    args = ["build", "-s", "chexpert", "--root", str(root), "--out", str(out), "-j", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "build.json" in result.output
    # stats has no --overwrite: the advice names the command that has one.
    result = runner.invoke(app, ["stats", str(out)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    assert "rebuild with `machex build ... --overwrite`" in result.output
    (out / "build.json").unlink()  # shards without a record of their options: refuse
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    (out / "build.json").write_text("{broken")
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert read_build_file(out)["sources"]["chexpert"]["status"] == "complete"


def _build_in_child(root: str, out: str) -> None:
    build_source("chexpert", Path(root), Path(out), BuildOptions(workers=2))


@pytest.mark.slow
def test_a_build_inside_a_multiprocessing_child_exits(sample_roots_pristine, tmp_path) -> None:
    """joblib keeps its worker pool for reuse; unless the build releases it, a process that
    ran a build (e.g. a scheduler's spawned child) hangs at exit joining the workers."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_build_in_child, args=(str(sample_roots_pristine["chexpert"]), str(tmp_path / "o"))
    )
    child.start()
    child.join(120)
    alive = child.is_alive()
    child.terminate()
    assert not alive and child.exitcode == 0
    assert load_manifest(tmp_path / "o", "images").shape[0] > 0


def test_a_shard_deleted_after_the_build_is_rebuilt_not_called_complete(
    sample_roots_pristine, tmp_path: Path
) -> None:
    """A tar lost since the build (deleted by hand, a disk clean-up) made a re-run say
    "already complete"; it now rebuilds that shard alone, byte for byte."""
    root, out = sample_roots_pristine["chexpert"], tmp_path / "out"
    options = BuildOptions(workers=1, shard_size=4)
    build_source("chexpert", root, out, options)
    before = snapshot(out)
    victim = sorted(out.glob("shards/chexpert/*.tar"))[1]
    victim.unlink()
    result = build_source("chexpert", root, out, options)
    assert (result.status, result.shards_written) == ("built", 1)
    after = snapshot(out)
    assert after["shards"] == before["shards"]
    for table, frame in before["tables"].items():
        pd.testing.assert_frame_equal(after["tables"][table], frame, obj=table)
    assert build_source("chexpert", root, out, options).status == "up_to_date"


class _ElsewhereExecutor:
    """Runs each shard task as a cluster worker started in another folder would: in that
    working directory (``write``: False reports the shard without writing it)."""

    def __init__(self, cwd: Path, write: bool = True) -> None:
        self.cwd, self.write = cwd, write

    def workers_used(self) -> int:
        return 1

    def run(self, tasks, on_advance):
        from machex.shardwork import ShardSummary, run_shard

        for task in tasks:
            here = os.getcwd()
            os.chdir(self.cwd)
            try:
                summary = run_shard(task) if self.write else ShardSummary(task.spec.stem, 0, 0, 0)
            finally:
                os.chdir(here)
            on_advance(len(task.spec.records))
            yield summary


def test_a_relative_out_reaches_workers_in_other_folders(
    sample_roots_pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out rel` with a scheduler: each worker wrote under its own working directory and
    the build was called complete with 0 images. OUT is made absolute first, and a shard
    reported but not in OUT is an error, never a complete build."""
    root = sample_roots_pristine["chexpert"]
    (tmp_path / "here").mkdir()
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    options = BuildOptions(workers=1, shard_size=4)
    build_source(
        "chexpert", root, Path("rel"), options, executor=_ElsewhereExecutor(tmp_path / "worker")
    )
    assert not (tmp_path / "worker" / "rel").exists()
    build_source("chexpert", root, tmp_path / "clean", options)
    assert_same_build(tmp_path / "here" / "rel", tmp_path / "clean")
    liar = _ElsewhereExecutor(tmp_path / "worker", write=False)
    with pytest.raises(BuildError, match=r"shard\(s\) reported built are not in"):
        build_source("chexpert", root, tmp_path / "lied", options, executor=liar)
    assert (
        json.loads((tmp_path / "lied" / "build.json").read_text())["sources"]["chexpert"]["status"]
        != "complete"
    )
