"""``machex verify``, ``machex export-index`` and ``machex preview`` on a built sample."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import load_manifest
from machex.build import BuildOptions, ProgressHooks, build_source
from machex.export import export_index
from machex.preview import figure_pixels
from machex.shards import read_member
from machex.verify import verify_collection

runner = CliRunner()
SOURCES = ("chestxray14", "vindr", "mimic")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from machex.sample import make_sample

    scratch = tmp_path_factory.mktemp("tools")
    roots = make_sample(scratch / "sample", list(SOURCES))
    out = scratch / "out"
    for name, root in roots.items():
        build_source(name, root, out, BuildOptions(workers=1))
    return out


def verify_json(out: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(out), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_verify_clean(built: Path) -> None:
    code, document = verify_json(built)
    assert code == 0, document
    assert document["ok"] is True and document["problems"] == []
    images = load_manifest(built, "images")
    assert document["images"] == document["hashed"] == len(images) > 0
    assert document["shards"] == images["shard"].nunique()
    result = runner.invoke(app, ["verify", str(built)])
    assert result.exit_code == 0 and "ok" in result.stdout


def test_verify_not_a_collection(tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2
    assert "no MaCheX build" in result.stderr


def test_verify_flipped_byte_names_the_key(copy: Path) -> None:
    row = load_manifest(copy, "images").sort_values("key").iloc[3]
    shard = copy / row["shard"]
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]) + int(row["size"]) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, document = verify_json(copy)
    assert code == 1
    assert [(p["kind"], p["key"]) for p in document["problems"]] == [("hash_mismatch", row["key"])]
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and row["key"] in result.stdout


def test_verify_deleted_shard_names_it(copy: Path) -> None:
    images = load_manifest(copy, "images")
    shard = sorted(images["shard"].unique())[0]
    (copy / shard).unlink()
    code, document = verify_json(copy)
    assert code == 1
    assert [(p["kind"], p["shard"]) for p in document["problems"]] == [("missing_shard", shard)]
    assert runner.invoke(app, ["verify", str(copy)]).stdout.count(shard) >= 1


def test_verify_extra_member_is_reported(copy: Path) -> None:
    shard = sorted(load_manifest(copy, "images")["shard"].unique())[-1]
    with tarfile.open(copy / shard, mode="a") as tar:
        info = tarfile.TarInfo("stray.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    code, document = verify_json(copy)
    assert code == 1
    assert [(p["kind"], p["shard"], p["member"]) for p in document["problems"]] == [
        ("extra_member", shard, "stray.txt")
    ]


def test_verify_unlisted_shard_and_missing_member(copy: Path) -> None:
    images = load_manifest(copy, "images")
    shard = sorted(images["shard"].unique())[0]
    shutil.copy(copy / shard, copy / "shards" / "stray.tar")
    # A tar rewritten without its first sample: the rows after it move too.
    first = images[images["shard"] == shard].sort_values("offset").iloc[0]
    rewritten = io.BytesIO()
    with tarfile.open(copy / shard) as src, tarfile.open(fileobj=rewritten, mode="w") as dst:
        for info in src:
            if not info.name.startswith(first["key"] + "."):
                dst.addfile(info, src.extractfile(info))
    (copy / shard).write_bytes(rewritten.getvalue())
    report = verify_collection(copy)
    kinds = report.counts()
    assert kinds["missing_member"] == 1 and kinds["unlisted_shard"] == 1
    assert "location_mismatch" in kinds
    missing = next(p for p in report.problems if p.kind == "missing_member")
    assert missing.key == first["key"]


def test_export_index_round_trips(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "export"
    result = runner.invoke(app, ["export-index", str(built), "--to", str(target), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert sorted(document["sources"]) == sorted(SOURCES)
    images = load_manifest(built, "images").set_index("key")
    seen = []
    for source in SOURCES:
        index = json.loads((target / source / "index.json").read_text())
        assert list(index) == [f"{i:06d}" for i in range(len(index))]
        keys = [entry["key"] for entry in index.values()]
        assert keys == sorted(keys)
        assert set(keys) == set(images.index[images["source"] == source])
        for identifier, entry in index.items():
            path = Path(entry["path"])
            assert path.is_absolute() and path.is_file()
            assert path == target.resolve() / source / identifier[:2] / f"{identifier}.jpg"
            row = images.loc[entry["key"]]
            original = Image.open(
                io.BytesIO(read_member(built / row["shard"], row["offset"], row["size"]))
            )
            with Image.open(path) as exported:
                assert exported.format == "JPEG" and exported.mode == "RGB"
                assert exported.size == original.size
                luma = np.asarray(exported.convert("L"), dtype=float)
            difference = np.abs(luma - np.asarray(original.convert("L"), dtype=float))
            assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8
            if source != "mimic":
                assert "report" not in entry
        if source == "mimic":
            assert (
                sum("report" in e for e in index.values())
                == document["sources"]["mimic"]["reports"]
                > 0
            )
        seen.extend(keys)
    assert sorted(seen) == sorted(images.index) and len(seen) == len(set(seen))


def test_export_index_one_source_and_reports(built: Path, tmp_path: Path) -> None:
    result = export_index(built, tmp_path / "x", ["mimic-cxr"])  # an alias, as --source takes
    assert list(result.sources) == ["mimic"]
    assert not (tmp_path / "x" / "vindr").exists()
    index = json.loads((tmp_path / "x" / "mimic" / "index.json").read_text())
    shard_rows = load_manifest(built, "images", ["mimic"]).set_index("key")
    for entry in index.values():
        if "report" not in entry:
            continue
        shard = built / shard_rows.loc[entry["key"], "shard"]
        with tarfile.open(shard) as tar:
            sample = json.loads(tar.extractfile(f"{entry['key']}.json").read())
        assert entry["report"] == sample["report"]
    bad = runner.invoke(
        app, ["export-index", str(built), "--to", str(tmp_path / "y"), "-s", "brax"]
    )
    assert bad.exit_code == 2


def test_export_index_cli_reads_the_images_manifest_once_for_its_progress(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress bar's total comes from export_index's own read (``on_start``), not from
    a second read of the images manifest by the CLI."""
    from cli import render
    from machex import export, manifests

    real = manifests.load_manifest
    reads: list[str] = []
    events: list[tuple] = []

    def counting(*args, **kwargs):
        reads.append(args[1])
        return real(*args, **kwargs)

    @contextmanager
    def recording(enabled: bool, console=None):
        yield ProgressHooks(
            lambda *start: events.append(("start", *start)),
            lambda n: events.append(("advance", n)),
        )

    monkeypatch.setattr(manifests, "load_manifest", counting)
    monkeypatch.setattr(export, "load_manifest", counting)
    monkeypatch.setattr(render, "build_progress", recording)
    result = runner.invoke(app, ["export-index", str(built), "--to", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    total = len(real(built, "images", columns=[]))
    assert reads == ["images"]
    assert events[0] == ("start", "export", total, 0)
    assert [kind for kind, *_ in events[1:]] == ["advance"] * (len(events) - 1)
    assert sum(n for _, n in events[1:]) == total > 0

    starts: list[int] = []
    export_index(built, tmp_path / "y", ["vindr"], on_start=starts.append)
    assert starts == [len(real(built, "images", "vindr", columns=[]))]


def test_preview_writes_png_of_documented_size(built: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["preview", str(built), "--out", str(grid), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document["keys"]) == 16
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.size == figure_pixels(16) == (1600, 1800)

    small = tmp_path / "vindr.png"
    where = "split == 'train' and Cardiomegaly == 1"
    args = ["preview", str(built), "-s", "vindr", "--where", where, "--n", "5", "--out"]
    result = runner.invoke(app, [*args, str(small), "--json", "--seed", "3"])
    assert result.exit_code == 0, result.output
    keys = json.loads(result.stdout)["keys"]
    assert keys and all(k.startswith("vindr-") for k in keys)
    with Image.open(small) as image:
        assert image.size == figure_pixels(5) == (1600, 900)

    bad = runner.invoke(app, ["preview", str(built), "--where", "nope ==", "--out", str(small)])
    assert bad.exit_code == 2
    none = runner.invoke(app, ["preview", str(built), "--where", "size < 0", "--out", str(small)])
    assert none.exit_code == 2


@pytest.mark.parametrize("command", ["preview", "stats"])
def test_an_unwritable_figure_path_exits_2_before_the_work(
    built: Path, tmp_path: Path, command: str
) -> None:
    """A folder given for the PNG, or a PNG under a file, is one line (exit 2), not an
    IsADirectoryError / FileExistsError traceback after the figure was drawn."""
    option = "--out" if command == "preview" else "--plot"
    afile = tmp_path / "afile"
    afile.write_text("")
    for dest, says in ((tmp_path, "is a folder"), (afile / "x.png", "cannot create its folder")):
        result = runner.invoke(app, [command, str(built), option, str(dest)])
        assert result.exit_code == 2, result.output
        assert f"{option} {dest}" in result.output and says in result.output
