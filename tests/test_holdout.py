"""Named held-out sets (``machex holdout``): reproducible draws, patient-disjointness, the
leakage report, refusals and the CLI."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import MaCheX
from machex.build import BuildOptions, build_source, plan_source
from machex.holdout import HoldoutError, list_holdouts, load_holdout, make_holdout
from machex.manifests import load_manifest
from machex.merge import merge_parts
from machex.parts import Part
from machex.sample import make_sample

runner = CliRunner()
SOURCES = ["chestxray14", "chexpert", "vindr"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built collection of three sources (never modified: tests copy it)."""
    base = tmp_path_factory.mktemp("holdout")
    roots = make_sample(base / "sample", SOURCES)
    out = base / "out"
    for name, root in roots.items():
        build_source(name, root, out, BuildOptions(workers=1))
    return out


@pytest.fixture
def out(collection: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(collection, copy)
    return copy


def images(out: Path) -> pd.DataFrame:
    return load_manifest(out, "images")[["key", "source", "patient_id"]]


def expected_leakage(out: Path, held: pd.DataFrame) -> dict[str, int]:
    """The leakage report's totals, computed independently of machex.holdout."""
    everything = images(out)
    rest = everything[~everything["key"].isin(held["key"])]
    patients = held[["source", "patient_id"]].drop_duplicates()
    outside = rest.merge(patients, on=["source", "patient_id"])
    return {
        "images": len(held),
        "patients": len(patients),
        "patients_straddling": len(outside[["source", "patient_id"]].drop_duplicates()),
        "images_outside": len(outside),
    }


def test_by_patient_is_patient_disjoint_and_reproducible(out: Path) -> None:
    result = make_holdout(out, "ho", 15)
    held = load_holdout(out, "ho")
    assert list(held.columns) == ["key", "source", "patient_id"]
    assert held["key"].is_monotonic_increasing and held["key"].is_unique
    assert len(held) == result.size >= 15
    # whole patients only: no held-out patient has an image outside the set
    everything = images(out)
    rest = everything[~everything["key"].isin(held["key"])]
    pairs = set(zip(held["source"], held["patient_id"]))
    assert not pairs & set(zip(rest["source"], rest["patient_id"]))
    # overshoot is less than the last patient taken
    biggest = everything.groupby(["source", "patient_id"]).size().max()
    assert result.size < 15 + biggest
    assert result.leakage["patients_straddling"] == result.leakage["images_outside"] == 0
    # the same seed gives the same set, byte for byte
    first = (out / "manifests/holdouts/ho.parquet").read_bytes()
    make_holdout(out, "ho", 15, overwrite=True)
    assert (out / "manifests/holdouts/ho.parquet").read_bytes() == first
    assert list_holdouts(out) == ["ho"]


def test_draw_does_not_depend_on_file_order(out: Path, tmp_path: Path) -> None:
    make_holdout(out, "a", 12, by="image", seed=3)
    # rename fragments so load_manifest reads the rows in another order: same draw
    order = list(load_manifest(out, "images")["key"])
    for path in sorted((out / "manifests/images").glob("source=*/*-t*.parquet")):
        path.rename(path.with_name("z" + path.name))  # test, train after val
    assert list(load_manifest(out, "images")["key"]) != order
    other = tmp_path / "other"
    shutil.copytree(out, other)
    shutil.rmtree(other / "manifests/holdouts")
    make_holdout(other, "a", 12, by="image", seed=3)
    pd.testing.assert_frame_equal(load_holdout(out, "a"), load_holdout(other, "a"))


def test_different_seeds_differ(out: Path) -> None:
    for by in ("patient", "image"):
        make_holdout(out, f"{by}-1", 10, seed=1, by=by)
        make_holdout(out, f"{by}-2", 10, seed=2, by=by)
        assert set(load_holdout(out, f"{by}-1")["key"]) != set(load_holdout(out, f"{by}-2")["key"])


def test_by_image_has_the_exact_size_and_a_true_leakage_report(out: Path) -> None:
    result = make_holdout(out, "img", 20, by="image")
    held = load_holdout(out, "img")
    assert result.size == len(held) == 20
    leakage = result.leakage
    assert {k: leakage[k] for k in expected_leakage(out, held)} == expected_leakage(out, held)
    assert leakage["patients_straddling"] > 0  # 20 of 44 images: some patients straddle
    per_source = held.groupby("source").size().to_dict()
    assert {s: row["images"] for s, row in leakage["by_source"].items()} == per_source
    for source, row in leakage["by_source"].items():
        assert row == {
            k: v
            for k, v in expected_leakage(out, held[held["source"] == source]).items()
            if k in row
        }
    # VinDr uses the image id as patient id: by image and by patient are alike there
    assert leakage["by_source"].get("vindr", {"patients_straddling": 0})["patients_straddling"] == 0


def test_sidecar_records_the_draw(out: Path) -> None:
    result = make_holdout(out, "v-1", 5, by="image", seed=7, sources=["nih", "vindr"])
    document = json.loads((out / "manifests/holdouts/v-1.json").read_text())
    assert document["name"] == "v-1"
    assert document["size_requested"] == document["size"] == 5
    assert document["seed"] == 7 and document["by"] == "image"
    assert document["sources"] == ["chestxray14", "vindr"]
    assert document["collection_images"] == 30 == result.collection_images
    assert document["leakage"] == result.leakage
    assert set(load_holdout(out, "v-1")["source"]) <= {"chestxray14", "vindr"}
    schema = pq.read_schema(out / "manifests/holdouts/v-1.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("key", "string"),
        ("source", "string"),
        ("patient_id", "string"),
    ]


def in_composition(out: Path, keys: pd.Series, name: str = "paper-2023") -> pd.Series:
    """Whether each key's (source, split) is one of the composition's pairs."""
    from machex.tables import load_composition

    table = load_manifest(out, "images").set_index("key").loc[keys]
    pairs = pd.MultiIndex.from_arrays([table["source"], table["split"]])
    return pd.Series(pairs.isin(load_composition(name)), index=keys.index)


def test_composition_draws_only_its_pairs(out: Path) -> None:
    # the sample's chestxray14/test, chexpert/val and vindr/test are outside paper-2023
    everything = load_manifest(out, "images")
    inside = in_composition(out, everything["key"])
    assert 0 < inside.sum() < len(everything)
    for by in ("image", "patient"):
        result = make_holdout(out, f"c-{by}", 20, by=by, composition="paper-2023")
        held = load_holdout(out, f"c-{by}")
        assert len(held) == result.size >= 20 and in_composition(out, held["key"]).all()
        assert result.collection_images == int(inside.sum())
        assert result.leakage["images"] == result.size
        document = json.loads((out / f"manifests/holdouts/c-{by}.json").read_text())
        assert document["composition"] == "paper-2023"
        assert document["collection_images"] == int(inside.sum())
        # the unrestricted draw, same seed and size, takes images outside the composition
        plain = make_holdout(out, f"p-{by}", 20, by=by)
        assert plain.composition is None and plain.collection_images == len(everything)
        assert not in_composition(out, plain.frame["key"]).all()
        assert set(plain.frame["key"]) != set(held["key"])
        # the same seed gives the same set, byte for byte; another seed another one
        first = (out / f"manifests/holdouts/c-{by}.parquet").read_bytes()
        make_holdout(out, f"c-{by}", 20, by=by, composition="paper-2023", overwrite=True)
        assert (out / f"manifests/holdouts/c-{by}.parquet").read_bytes() == first
        other = make_holdout(out, f"o-{by}", 20, by=by, seed=2, composition="paper-2023")
        assert set(other.frame["key"]) != set(held["key"])
    assert json.loads((out / "manifests/holdouts/p-image.json").read_text())["composition"] is None


def test_composition_and_source_intersect(out: Path) -> None:
    result = make_holdout(out, "nih", 4, by="image", sources=["nih"], composition="paper-2023")
    nih = load_manifest(out, "images", "chestxray14")
    assert result.sources == ["chestxray14"]
    assert result.collection_images == int((nih["split"] == "train").sum()) < len(nih)
    assert set(load_manifest(out, "images").set_index("key").loc[result.frame["key"], "split"]) == {
        "train"
    }
    with pytest.raises(HoldoutError, match=r"more than the 15 images .*composition paper-2023"):
        make_holdout(out, "big", 16, sources=["nih"], composition="paper-2023")
    with pytest.raises(HoldoutError, match=r"openi is not in composition 'paper-2023'"):
        make_holdout(out, "x", 1, sources=["openi", "nih"], composition="paper-2023")
    with pytest.raises(HoldoutError, match="no images of padchest"):  # in it, but not built
        make_holdout(out, "x", 1, sources=["padchest"], composition="paper-2023")
    with pytest.raises(HoldoutError, match="unknown composition 'paper-2024'"):
        make_holdout(out, "x", 1, composition="paper-2024")
    assert list_holdouts(out) == ["nih"]


@pytest.mark.parametrize(
    "name", ["", "a b", "../x", "x.y", "é", "test", "train", "val", "TEST", "none", "None"]
)
def test_refuses_a_bad_name(out: Path, name: str) -> None:
    with pytest.raises(HoldoutError):
        make_holdout(out, name, 5)
    assert not (out / "manifests/holdouts").exists()


def test_refuses_an_existing_name_and_bad_sizes(out: Path, tmp_path: Path) -> None:
    make_holdout(out, "ho", 5, seed=1)
    before = load_holdout(out, "ho")
    with pytest.raises(HoldoutError, match="--overwrite"):
        make_holdout(out, "ho", 5, seed=2)
    pd.testing.assert_frame_equal(load_holdout(out, "ho"), before)
    make_holdout(out, "ho", 5, seed=2, overwrite=True)
    with pytest.raises(HoldoutError, match="more than the 44 images"):
        make_holdout(out, "big", 45)
    with pytest.raises(HoldoutError, match="more than the 10 images"):
        make_holdout(out, "big", 11, sources=["vindr"])
    for size in (0, -1):
        with pytest.raises(HoldoutError):
            make_holdout(out, "small", size)
    with pytest.raises(HoldoutError, match="no images of padchest"):
        make_holdout(out, "p", 1, sources=["padchest"])
    with pytest.raises(HoldoutError, match="patient or image"):
        make_holdout(out, "p", 1, by="study")
    with pytest.raises(HoldoutError, match="no MaCheX build"):
        make_holdout(tmp_path / "nothing", "p", 1)
    with pytest.raises(HoldoutError, match="no holdout"):
        load_holdout(out, "missing")
    assert list_holdouts(out) == ["ho"]


def test_an_overwrite_cut_off_between_its_files_leaves_an_unfinished_set(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the parquet's rename and the sidecar's, an overwrite left the new rows
    beside the old sidecar: a set drawn by patient read as one drawn by image (kept out by
    key only)."""
    import machex.holdout as module

    make_holdout(out, "ho", 5, seed=1, by="image")
    renames = []
    real = module.os.replace

    def killed_before_the_sidecar(source, target):
        renames.append(target)
        if str(target).endswith(".json"):
            raise KeyboardInterrupt
        return real(source, target)

    monkeypatch.setattr(module.os, "replace", killed_before_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        make_holdout(out, "ho", 6, seed=2, by="patient", overwrite=True)
    monkeypatch.undo()
    assert list_holdouts(out) == []  # not a finished set
    with pytest.raises(HoldoutError, match="its writing was interrupted"):
        MaCheX(out, exclude_holdout="ho")


def test_cli_json(out: Path) -> None:
    args = ["holdout", str(out), "--name", "h25", "--size", "8", "--by", "image", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["size"] == 8 and document["seed"] == 1337 and document["by"] == "image"
    assert document["leakage"]["images"] == 8
    sidecar = json.loads((out / "manifests/holdouts/h25.json").read_text())
    for key in ("size", "seed", "by", "sources", "leakage", "collection_images"):
        assert document[key] == sidecar[key]
    # the same name again: exit 2; with --overwrite: 0
    assert runner.invoke(app, args).exit_code == 2
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    table = runner.invoke(app, ["holdout", str(out), "--name", "p", "-n", "3", "-s", "chexpert"])
    assert table.exit_code == 0, table.output
    assert "chexpert" in table.stdout and "written to" in table.stdout
    args = ["holdout", str(out), "--name", "c", "-n", "5", "--composition", "paper-2023"]
    composed = runner.invoke(app, [*args, "--json"])
    assert composed.exit_code == 0, composed.output
    document = json.loads(composed.stdout)
    assert document["composition"] == "paper-2023" and document["collection_images"] == 35
    table = runner.invoke(app, [*args[:3], "c2", *args[4:], "--by", "image"])
    assert table.exit_code == 0, table.output
    assert "composition paper-2023" in table.stdout
    outside = runner.invoke(app, [*args[:3], "x", *args[4:], "-s", "openi"])
    assert outside.exit_code == 2
    assert "openi is not in composition 'paper-2023'" in outside.stderr


@pytest.mark.parametrize(
    "extra",
    [
        ["--name", "test", "--size", "3"],
        ["--name", "a/b", "--size", "3"],
        ["--name", "x", "--size", "1000"],
        ["--name", "x", "--size", "3", "--by", "study"],
        ["--name", "x", "--size", "3", "--source", "padchest"],
        ["--name", "x", "--size", "3", "--source", "openi", "--composition", "paper-2023"],
        ["--name", "x", "--size", "3", "--composition", "paper-2024"],
        ["--name", "x", "--size", "36", "--composition", "paper-2023"],
    ],
)
def test_cli_bad_input_exits_2(out: Path, extra: list[str]) -> None:
    result = runner.invoke(app, ["holdout", str(out), *extra])
    assert result.exit_code == 2, result.output


def test_cli_unknown_out_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["holdout", str(tmp_path), "--name", "x", "--size", "3"])
    assert result.exit_code == 2
    assert "no MaCheX build" in result.stderr


def test_by_patient_keeps_out_their_images_built_after_the_draw(tmp_path: Path) -> None:
    """Images that failed at the draw and were built later (--retry-failed) belong to held-out
    patients all the same: left out of training (not added to the set), with a warning that
    the collection changed since the draw."""
    root = make_sample(tmp_path / "sample", ["chexpert"])["chexpert"]
    out = tmp_path / "out"
    per_patient = defaultdict(list)
    for record in plan_source("chexpert", root).records:
        per_patient[record.patient_id].append(Path(record.path))
    broken = {paths[-1]: paths[-1].read_bytes() for paths in per_patient.values() if len(paths) > 1}
    for path in broken:
        path.write_bytes(b"not an image")
    options = BuildOptions(workers=1, max_failure_rate=1.0)
    assert build_source("chexpert", root, out, options).failed == len(broken) > 0
    late = {p for p, paths in per_patient.items() if paths[-1] in broken}
    total = sum(map(len, per_patient.values()))
    for seed in range(100):  # a draw holding out a patient with a failed image, not all
        held = make_holdout(out, "ho", 4, seed=seed, overwrite=True).frame
        if late & set(held["patient_id"]) and len(set(held["patient_id"])) < len(per_patient):
            break
    else:
        pytest.fail("no seed holds out a patient with a failed image and leaves one in training")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the collection is as drawn: no warning
        assert len(MaCheX(out, splits=None, exclude_holdout="ho")) == total - len(broken) - len(
            held
        )
    for path, data in broken.items():
        path.write_bytes(data)
    assert build_source("chexpert", root, out, options, retry_failed=True).failed == 0

    counts = f"{total - len(broken)} images at the draw, {total} now"
    changed = rf"'ho' of .* changed since the draw \({counts}; \d+ images? of its patients built"
    with pytest.warns(UserWarning, match=changed):
        training = MaCheX(out, splits=None, exclude_holdout="ho").manifest
    everything = images(out)
    theirs = everything["patient_id"].isin(held["patient_id"])
    assert len(everything[theirs]) > len(held)  # some of their images were built since
    assert set(training["key"]) == set(everything.loc[~theirs, "key"])
    with pytest.warns(UserWarning, match=changed):
        test = MaCheX(out, splits="ho").manifest
    assert sorted(test["key"]) == sorted(held["key"])  # the set as drawn


def test_part_runs_not_merged_are_refused(tmp_path: Path) -> None:
    """--part runs write no build.json entry: until `machex merge` has checked every part,
    the source is not complete, even with all parts finished."""
    root = make_sample(tmp_path / "sample", ["chexpert"])["chexpert"]
    out = tmp_path / "out"
    options = BuildOptions(workers=1, shard_size=2)
    not_merged = r"--part runs of chexpert in .* are not merged.*`machex merge "
    for index in range(2):
        build_source("chexpert", root, out, options, part=Part(index, 2))
        with pytest.raises(HoldoutError, match=not_merged):
            make_holdout(out, "ho", 3)
        with pytest.warns(UserWarning, match=r"--part runs of chexpert \(\d+ images so far\)"):
            MaCheX(out, splits=None)
    result = runner.invoke(app, ["holdout", str(out), "--name", "ho", "--size", "3"])
    assert result.exit_code == 2 and "machex merge" in result.stderr, result.output
    merge_parts(out)
    held = make_holdout(out, "ho", 3).frame
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training = MaCheX(out, splits=None, exclude_holdout="ho")
    assert len(training) == len(images(out)) - len(held)
    assert list_holdouts(out) == ["ho"]


def test_images_without_a_patient_id_are_their_own_patients(out: Path, tmp_path: Path) -> None:
    """Writing a set with a null patient id failed (NaN from .tolist() under pandas 3)."""

    import pyarrow as pa

    from machex.manifests import fragment_path

    root = tmp_path / "copy"
    shutil.copytree(out, root)
    images = load_manifest(root, "images")
    source, shard = images.iloc[0][["source", "shard"]]
    path = fragment_path(root, "images", source, Path(shard).name.removesuffix(".tar"))
    table = pq.read_table(path)
    column = table.schema.get_field_index("patient_id")
    nulls = pa.nulls(table.num_rows, pa.string())
    pq.write_table(table.set_column(column, "patient_id", nulls), path)
    result = make_holdout(root, "nulls", len(images) - 1, by="patient", seed=0)
    held = load_holdout(root, "nulls")
    assert len(held) == result.size and held["patient_id"].isna().sum() > 0


def test_datasets_tell_a_change_from_the_images_they_loaded(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MaCheX checks a held-out set against the images manifest it has loaded (not read a
    second time) and warns exactly as a check that reads it; a dataset of fewer sources
    than the set was drawn from reads the manifest, as ever."""
    import pyarrow.compute as pc

    from machex import holdout
    from machex.holdout import collection_change, load_holdout_info
    from machex.manifests import fragment_path

    make_holdout(out, "ho", 10, seed=0)  # from all three sources
    make_holdout(out, "comp", 5, seed=0, composition="paper-2023")
    real = holdout.load_manifest
    reads: list[object] = []

    def refused(*args, **kwargs):
        raise AssertionError("the images manifest was read again")

    def user_warnings(**selection) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MaCheX(out, **selection)
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    selections = [  # the sets each warns about, in order
        (["ho"], {"splits": None, "exclude_holdout": "ho"}),
        (["ho"], {"splits": "ho"}),
        (["ho", "comp"], {"sources": SOURCES, "splits": ["ho"], "exclude_holdout": "comp"}),
        (["ho"], {"composition": "paper-2023", "exclude_holdout": "ho"}),
        (["comp"], {"composition": "paper-2023", "exclude_holdout": "comp"}),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(holdout, "load_manifest", refused)
        for _, selection in selections:
            assert user_warnings(**selection) == []  # as drawn

    # one held-out image of each set gone from the collection since the draw
    images = load_manifest(out, "images").set_index("key")
    for name in ("ho", "comp"):
        key = load_holdout(out, name)["key"].iloc[0]
        source, shard = images.loc[key, ["source", "shard"]]
        path = fragment_path(out, "images", source, Path(shard).name.removesuffix(".tar"))
        pq.write_table(pq.read_table(path).filter(pc.field("key") != key), path)
    expected = {  # as read from disk, the way it always was
        name: collection_change(out, name, load_holdout(out, name), load_holdout_info(out, name))
        for name in ("ho", "comp")
    }
    assert all(f"held-out set {name!r} of" in expected[name] for name in expected)
    assert all("1 of its" in message for message in expected.values())
    with monkeypatch.context() as patch:
        patch.setattr(holdout, "load_manifest", refused)
        for names, selection in selections:
            assert user_warnings(**selection) == [expected[n] for n in names], selection
        # fewer sources than drawn from: the manifest is read, as before
        patch.setattr(holdout, "load_manifest", lambda *a, **k: reads.append(a[2]) or real(*a, **k))
        assert user_warnings(sources="vindr", splits=None, exclude_holdout="ho") == [expected["ho"]]
        assert reads == [SOURCES]


def test_unfinished_sources_are_told_apart_alike_by_holdout_and_dataset(out: Path) -> None:
    """A build still running and --part runs not merged: refused by `machex holdout` and
    loaded with a warning by MaCheX, each with its own advice."""
    from machex.holdout import unfinished_by_kind
    from machex.parts import PARTS_DIR

    record = json.loads((out / "build.json").read_text())
    for source in ("chexpert", "vindr"):
        record["sources"][source]["status"] = "in_progress"
    (out / "build.json").write_text(json.dumps(record))
    (out / PARTS_DIR / "vindr").mkdir(parents=True)
    assert unfinished_by_kind(out, SOURCES) == (["chexpert"], ["vindr"])
    assert unfinished_by_kind(out, ["chestxray14"]) == ([], [])
    with pytest.raises(HoldoutError) as error:
        make_holdout(out, "ho", 3)
    assert str(error.value) == (
        f"the build of chexpert in {out} is not complete, so the draw would change when it "
        f"is; finish the build first; the --part runs of vindr in {out} are not merged, so "
        "the draw would change when they are; run every part, then `machex merge "
        f"{out}`, or leave it out with --source"
    )
    counts = images(out)["source"].value_counts()
    with pytest.warns(UserWarning) as caught:
        MaCheX(out, splits=None)
    assert [str(w.message) for w in caught] == [
        f"{out}: the build of chexpert ({counts['chexpert']:,} images so far) is not "
        "complete, so this dataset holds only part of it; re-run the same `machex build` "
        "command to finish it",
        f"{out}: the --part runs of vindr ({counts['vindr']:,} images so far) are not merged, "
        "so this dataset may hold only part of it; run every part (`machex build ... --part "
        f"I/N`), then `machex merge {out}`",
    ]
