"""The machex CLI: exit codes first, then the --json documents."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex.shards import ShardWriter

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_dry_run_json_on_the_sample(sample_roots_pristine) -> None:
    root = sample_roots_pristine["chexpert"]
    result = invoke("build", "--source", "chexpert", "--root", root, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["sources"]["chexpert"]
    train = pd.read_csv(root / "train.csv")
    valid = pd.read_csv(root / "valid.csv")
    frontal = (train["Frontal/Lateral"] == "Frontal").sum() + (
        valid["Frontal/Lateral"] == "Frontal"
    ).sum()
    assert plan["planned"] == plan["to_build"] == frontal
    assert plan["skipped"] == {"lateral": len(train) + len(valid) - frontal}
    assert set(plan) >= {"planned", "by_split", "by_view", "skipped", "known_bad", "missing_files"}
    assert plan["missing_files"] == 0


def test_dry_run_on_the_full_real_chexpert_metadata(real_metadata: Path, tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    shutil.copy(real_metadata / "chexpert_train.csv.gz", root / "train.csv.gz")
    result = invoke(
        "build",
        "-s",
        "chexpert",
        "--root",
        root,
        "--dry-run",
        "--json",
        "--composition",
        "paper-2023",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    plan = document["sources"]["chexpert"]
    assert plan["planned"] == 191_027
    assert plan["by_view"]["LL"] == 16 and plan["by_view"]["RL"] == 1
    # The paper's Table 1 beside it: 191,027 against 191,027.
    row = next(r for r in document["paper"]["rows"] if r["source"] == "chexpert")
    assert row["paper"]["in_machex"] == row["ours"]["in_composition"] == 191_027
    assert row["status"] == "match"
    result = invoke(
        "build", "-s", "chexpert", "--root", root, "--dry-run", "--composition", "paper-2023"
    )
    assert result.exit_code == 0 and "191,027" in result.output and "match" in result.output


def test_wrong_root_exits_2_naming_the_files(tmp_path: Path) -> None:
    result = invoke("build", "-s", "nih", "--root", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "Data_Entry_2017_v2020.csv" in result.output
    assert not (tmp_path / "out").exists(), "no work may start before the inputs are checked"


def test_missing_columns_exit_2_naming_file_and_columns(sample_roots, tmp_path) -> None:
    root = sample_roots["chexpert"]
    frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["AP/PA", "Edema"]).to_csv(root / "train.csv", index=False)
    result = invoke("build", "-s", "chexpert", "--root", root, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "train.csv" in result.output and "'AP/PA'" in result.output
    assert "'Edema'" in result.output


def test_unknown_source_exits_2() -> None:
    result = invoke("build", "-s", "dragon", "--root", ".", "--dry-run")
    assert result.exit_code == 2
    assert "chexpert" in result.output


def test_build_then_stats_json(sample_roots_pristine, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for source in ("nih", "chexpert"):
        result = invoke(
            "build",
            "-s",
            source,
            "--root",
            sample_roots_pristine["chestxray14" if source == "nih" else source],
            "--out",
            out,
            "-j",
            "1",
            "--json",
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["sources"]
    result = invoke("stats", out, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    nih = sample_roots_pristine["chestxray14"]
    assert stats["images"]["chestxray14"]["test"] == len(
        (nih / "test_list.txt").read_text().split()
    )
    assert stats["total_images"] == sum(sum(v.values()) for v in stats["images"].values())
    assert stats["skipped"]["chexpert"]["lateral"] > 0
    assert stats["bboxes"]["chestxray14"]["boxes"] > 0
    assert stats["labels"]["chestxray14"]["Fracture"]["not_mentioned"] == sum(
        stats["images"]["chestxray14"].values()
    )
    assert stats["builds"]["chexpert"]["status"] == "complete"
    assert "Research Use Agreement" in stats["builds"]["chexpert"]["licence"]  # recorded
    # The rich rendering works too, data-use terms included.
    result = invoke("stats", out)
    assert result.exit_code == 0 and "Pleural Effusion" in result.output
    assert "Data-use terms" in result.output and "Stanford" in result.output
    # Against the paper, with a figure.
    figure = tmp_path / "machex.png"
    result = invoke("stats", out, "--composition", "paper-2023", "--plot", figure, "--json")
    assert result.exit_code == 0, result.output
    paper = json.loads(result.stdout)["paper"]
    nih = next(r for r in paper["rows"] if r["source"] == "chestxray14")
    assert nih["ours"]["in_composition"] == stats["images"]["chestxray14"]["train"]
    assert nih["status"] == "differs" and "train_val_list" in nih["note"]
    from PIL import Image

    with Image.open(figure) as image:
        assert image.size == (1600, 1000)
    result = invoke("stats", out, "--composition", "no-such-thing")
    assert result.exit_code == 2


def test_an_unwritable_out_folder_is_one_line_exit_2(sample_roots_pristine, tmp_path, monkeypatch):
    """A file in the way, a read-only or a full disk: one line naming the folder, no traceback."""
    root = sample_roots_pristine["chestxray14"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        result = invoke("build", "-s", "nih", "--root", root, "--out", out, "-j", "1", "-q")
        assert result.exit_code == 2, result.output
        assert f"{blocker} is a file; expected a folder" in result.output
        assert "Traceback" not in result.output

    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:
        if self.name == ".locks":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", read_only)
        result = invoke("build", "-s", "nih", "--root", root, "--out", out, "-j", "1", "-q")
    assert result.exit_code == 2, result.output
    assert f"--out {out}: cannot write there (Read-only file system)" in result.output

    def disk_full(self, name: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "add", disk_full)
        result = invoke("build", "-s", "nih", "--root", root, "--out", out, "-j", "1", "-q")
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "run the same command" in result.output
    assert not list(out.rglob("*.tmp")), "the aborted shard's temporary file is left"

    result = invoke("build", "-s", "nih", "--root", root, "--out", out, "-j", "1", "-q")
    assert result.exit_code == 0, result.output
    for to in (blocker, blocker / "x"):
        result = invoke("export-index", out, "--to", to, "-q")
        assert result.exit_code == 2, result.output
        assert f"--to {to}: {blocker} is a file" in result.output


def test_images_missing_warn_in_the_dry_run_and_all_missing_refuse_the_build(
    sample_roots, tmp_path
) -> None:
    """Metadata without its images (a wrong --root, a release not downloaded): the dry run
    warns past half missing; a build with none on disk refuses before writing anything."""
    root = sample_roots["chestxray14"]
    images = sorted(root.glob("images_*/images/*.png"))
    for image in images[: len(images) // 2 + 2]:
        image.unlink()
    result = invoke("build", "-s", "nih", "--root", root, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["sources"]["chestxray14"]["warnings"]
    assert any(f"are not under {root}" in w for w in warnings), warnings
    for image in images:
        image.unlink(missing_ok=True)
    result = invoke("build", "-s", "nih", "--root", root, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "listed images are not under" in result.output
    out = tmp_path / "out"
    result = invoke("build", "-s", "nih", "--root", root, "--out", out, "-j", "1", "-q")
    assert result.exit_code == 2, result.output
    assert f"none of the {len(images)} images listed for chestxray14" in result.output
    assert "(e.g. " in result.output and ".png)" in result.output  # where one was expected
    assert not out.exists(), "nothing may be written"


def test_stats_on_a_folder_that_is_no_build(tmp_path: Path) -> None:
    result = invoke("stats", tmp_path)
    assert result.exit_code == 2


def test_sources_lists_the_registry() -> None:
    result = invoke("sources", "--json")
    assert result.exit_code == 0
    from machex.adapters import ADAPTERS

    sources = json.loads(result.stdout)["sources"]
    assert set(sources) == set(ADAPTERS) >= {"chestxray14", "chexpert", "vindr", "brax"}
    assert sources["brax"]["image_formats"] == ["png", "dicom"]
    assert sources["vindr"]["image_formats"] == ["dicom"]


@pytest.mark.slow
def test_demo_runs_as_the_readme_says(tmp_path: Path) -> None:
    """`machex demo` through the installed console script, as a user would run it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.machex_cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--json",
            "-j",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    from machex.sample import SAMPLE_SOURCES

    assert set(stats["images"]) == set(SAMPLE_SOURCES)
    assert all(d["status"] == "built" for d in stats["demo"].values())


def test_the_demo_never_overwrites_a_build_of_real_data(sample_roots_pristine, tmp_path):
    """`machex demo -o` a real collection's folder rebuilt each source with overwrite: the
    user's shards of the same names were deleted."""
    out = tmp_path / "out"
    root = sample_roots_pristine["chexpert"]  # not the demo's own generated roots
    assert invoke("build", "-s", "chexpert", "--root", root, "--out", out, "-j", "1").exit_code == 0
    before = sorted((out / "shards").rglob("*.tar"))
    result = invoke("demo", "--out", out, "-j", "1")
    assert result.exit_code == 2
    assert f"holds a build of real data (chexpert from {root})" in result.output
    assert "another --out" in result.output
    assert sorted((out / "shards").rglob("*.tar")) == before
    # A --part run writes no build.json: its shards are the user's all the same.
    parts = tmp_path / "parts"
    args = ["build", "-s", "chexpert", "--root", root, "--out", parts, "-j", "1"]
    assert invoke(*args, "--part", "1/2", "--shard-size", "5").exit_code == 0
    before = sorted((parts / "shards").rglob("*.tar"))
    assert before and not (parts / "build.json").exists()
    result = invoke("demo", "--out", parts, "-j", "1")
    assert result.exit_code == 2 and "chexpert: shards or --part runs" in result.output
    assert sorted((parts / "shards").rglob("*.tar")) == before


def test_progress_bar_shows_images_per_second_and_eta(sample_roots_pristine, tmp_path) -> None:
    """On a terminal the build shows a bar per source with img/s and ETA (rendered here into
    a forced-terminal console, since the test's stderr is not one)."""
    import io

    from rich.console import Console

    from cli.render import build_progress
    from machex.build import BuildOptions, build_source

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    with build_progress(True, console) as hooks:
        build_source(
            "chexpert",
            sample_roots_pristine["chexpert"],
            tmp_path / "out",
            BuildOptions(workers=1, shard_size=2),
            hooks=hooks,
        )
    text = screen.getvalue()
    assert "chexpert" in text and "img/s" in text and "ETA" in text
    from machex.build import plan_source

    total = len(plan_source("chexpert", sample_roots_pristine["chexpert"]).records)
    assert f"{total}/{total}" in text
    quiet = io.StringIO()
    with build_progress(False, Console(file=quiet, force_terminal=True)) as hooks:
        hooks.on_start("x", 1, 0)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("damage", ["cut", "garbled"])
def test_a_damaged_gzipped_metadata_file_exits_2_naming_it(sample_roots, damage: str) -> None:
    """A partly downloaded ``.csv.gz`` ended in EOFError, which click turned into a bare
    "Aborted." (exit 1); corrupt gzip data likewise escaped as zlib.error."""
    root = sample_roots["mimic"]
    (path,) = root.rglob("mimic-cxr-2.0.0-metadata.csv.gz")
    data = path.read_bytes()
    path.write_bytes(data[:100] if damage == "cut" else data[:20] + bytes(200) + data[220:])
    result = invoke("build", "-s", "mimic", "--root", root, "--dry-run")
    assert result.exit_code == 2, result.output
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in result.output
    assert "re-download" in result.output


def test_a_metadata_file_without_its_telling_column_is_named(sample_roots) -> None:
    """Not "missing []": the file is there, its header is not the dataset's."""
    root = sample_roots["chexpert"]
    (root / "train.csv").write_text("\ufffd garbage\n")
    result = invoke("build", "-s", "chexpert", "--root", root, "--dry-run")
    assert result.exit_code == 2, result.output
    assert "train.csv has no 'Path' column" in result.output.replace("\n", " ")
