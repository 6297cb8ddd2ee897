"""The whole collection: a roots file, every source planned or built into one --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import load_manifest
from machex.adapters import MetadataError
from machex.build import BuildOptions
from machex.collection import SourceRoot, build_collection, read_roots

runner = CliRunner()


def write_roots(path: Path, roots: dict[str, Path]) -> Path:
    path.write_text("".join(f'{name} = "{root}"\n' for name, root in roots.items()))
    return path


def test_roots_file_forms(tmp_path: Path) -> None:
    roots = tmp_path / "roots.toml"
    roots.write_text(
        'nih = "/data/nih"\n'
        'brax = { root = "brax/1.1.0", prefer = "dicom" }\n'
        '[chexpert]\nroot = "/data/chexpert"\nreports = "~/reports.zip"\n'
    )
    entries = read_roots(roots)
    assert entries == [
        SourceRoot("chestxray14", Path("/data/nih")),  # the alias resolves to the name
        SourceRoot("brax", tmp_path / "brax/1.1.0", prefer="dicom"),  # relative to the file
        SourceRoot("chexpert", Path("/data/chexpert"), reports=Path("~/reports.zip").expanduser()),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nih = [1, 2", "not valid TOML"),
        ("", "names no source"),
        ('dragon = "/x"', "unknown source 'dragon'"),
        ('brax = { prefer = "png" }', "must be a path or a table with root"),
        ('brax = { root = "/x", colour = "red" }', r"brax has \['colour'\]"),
        ('nih = "/a"\nchestxray14 = "/b"', "chestxray14 is named twice"),
        ('roots = "/data/ChestX-ray14"', "roots must be a table of sources"),
    ],
)
def test_bad_roots_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    roots = tmp_path / "roots.toml"
    roots.write_text(text)
    with pytest.raises(MetadataError, match=message):
        read_roots(roots)


def test_a_folder_given_as_roots_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="is a folder; --roots takes a TOML file"):
        read_roots(tmp_path)


def test_dry_run_of_all_sources_compares_with_the_paper(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    roots = write_roots(tmp_path / "roots.toml", sample_roots_pristine)
    result = runner.invoke(
        app, ["build", "--source", "all", "--roots", str(roots), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document["sources"]) == set(sample_roots_pristine)
    rows = {row["source"]: row for row in document["paper"]["rows"]}
    for name in sample_roots_pristine:
        planned = document["sources"][name]["by_split"]
        if name in rows and rows[name]["ours"]["in_composition"] is not None:
            assert rows[name]["ours"]["in_composition"] <= sum(planned.values())


def test_build_all_equals_one_source_at_a_time(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    two = {k: v for k, v in sample_roots_pristine.items() if k in ("chexpert", "vindr")}
    roots = write_roots(tmp_path / "roots.toml", two)
    result = runner.invoke(
        app,
        ["build", "-s", "all", "--roots", str(roots), "--out", str(tmp_path / "all"), "-j", "1"],
    )
    assert result.exit_code == 0, result.output
    one_by_one = tmp_path / "one"
    for name, root in two.items():
        single = runner.invoke(
            app, ["build", "-s", name, "--root", str(root), "--out", str(one_by_one), "-j", "1"]
        )
        assert single.exit_code == 0, single.output
    for table in ("images", "labels", "bboxes", "reader_labels"):
        a = load_manifest(tmp_path / "all", table).sort_values("key", ignore_index=True)
        b = load_manifest(one_by_one, table).sort_values("key", ignore_index=True)
        assert a.equals(b), table
    assert set(load_manifest(tmp_path / "all", "images")["source"]) == set(two)


def test_one_source_of_a_roots_file(sample_roots_pristine: dict[str, Path], tmp_path: Path):
    roots = write_roots(tmp_path / "roots.toml", sample_roots_pristine)
    result = runner.invoke(
        app, ["build", "-s", "chexpert", "--roots", str(roots), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["sources"]) == ["chexpert"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "all"], "--source all needs --roots"),
        (["-s", "chexpert"], "needs --root DIR"),
        (["-s", "all", "--roots", "R", "--root", "/x"], "not both"),
    ],
)
def test_source_and_root_combinations(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path / "roots.toml") if a == "R" else a for a in args]
    (tmp_path / "roots.toml").write_text('chexpert = "/nowhere"\n')
    result = runner.invoke(app, ["build", *args, "--dry-run"])
    assert result.exit_code == 2
    assert message in result.output


def test_a_bad_root_stops_the_run_before_any_image_is_read(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    entries = [
        SourceRoot("vindr", sample_roots_pristine["vindr"]),
        SourceRoot("chexpert", tmp_path / "missing"),
    ]
    out = tmp_path / "out"
    with pytest.raises(MetadataError, match="missing"):
        build_collection(entries, out, BuildOptions(workers=1))
    assert load_manifest(out, "images").empty  # every source is planned before any build


def test_a_source_without_its_images_stops_the_run_before_any_is_built(
    sample_roots_pristine: dict[str, Path], tmp_path: Path
) -> None:
    """Metadata downloaded, images not: refused up front, not after the earlier sources."""
    import shutil

    from machex.build import BuildError

    bare = tmp_path / "chexpert"
    shutil.copytree(sample_roots_pristine["chexpert"], bare)
    for image in bare.rglob("*.jpg"):
        image.unlink()
    entries = [
        SourceRoot("vindr", sample_roots_pristine["vindr"]),
        SourceRoot("chexpert", bare),
    ]
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="none of the .* images listed for chexpert"):
        build_collection(entries, out, BuildOptions(workers=1))
    assert load_manifest(out, "images").empty


def test_views_naming_no_known_group_is_refused(sample_roots_pristine, tmp_path: Path) -> None:
    root = sample_roots_pristine["chexpert"]
    result = runner.invoke(
        app, ["build", "-s", "chexpert", "--root", str(root), "--views", "+latteral", "--dry-run"]
    )
    assert result.exit_code == 2
    assert "no source has the view group(s) ['latteral']" in result.output


def test_a_build_with_chosen_report_options_resumes(sample_roots_pristine, tmp_path: Path):
    root, out = sample_roots_pristine["vindr"], tmp_path / "out"
    args = ["build", "-s", "vindr", "--root", str(root), "--out", str(out), "-j", "1"]
    args += ["--report-text", "findings_impression", "--report-languages", "es,en"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [*args[:-1], "EN,es"])  # same choice, other spelling
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output


def test_reports_for_a_source_without_separate_reports(sample_roots_pristine) -> None:
    root = sample_roots_pristine["chexpert"]
    result = runner.invoke(
        app, ["build", "-s", "chexpert", "--root", str(root), "--reports", "/x.zip", "--dry-run"]
    )
    assert result.exit_code == 2
    assert "no separately shipped reports" in result.output
