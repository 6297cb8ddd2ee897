"""The paper's Table 1 as data, our counts beside it (built or dry run), and the overview plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from machex import load_manifest
from machex.build import BuildOptions, build_source, plan_source
from machex.paper import (
    CollectionCounts,
    compare_with_paper,
    load_paper_summary,
    load_paper_table,
)
from machex.plots import PIXELS, plot_collection

PAPER_SOURCES = ["chestxray14", "chexpert", "mimic", "padchest", "brax", "vindr"]
SAMPLE_SOURCES = ("chestxray14", "chexpert")


def rows_by_source(comparison: dict) -> dict[str, dict]:
    return {row["source"]: row for row in comparison["rows"]}


def test_paper_tables_parse_and_sum() -> None:
    table = load_paper_table()
    assert [row.source for row in table] == PAPER_SOURCES
    total = sum(row.in_machex for row in table)
    figures = {f.figure: f for f in load_paper_summary()}
    assert total == figures["images"].value == 651_471
    assert figures["images"].comparison == "exact"
    assert (figures["labels"].value, figures["labels"].comparison) == (440_000, "at_least")
    assert (figures["reports"].value, figures["reports"].comparison) == (220_000, "at_least")
    assert figures["images_with_boxes"].value == 15_000
    for row in table:  # the printed shares are the in-MaCheX column over its sum
        assert row.share_percent == pytest.approx(100 * row.in_machex / total, abs=0.01)
        assert row.note and row.origin
    by_source = {row.source: row for row in table}
    assert by_source["vindr"].patients is None  # "–" in the paper
    assert by_source["mimic"].test is None
    assert (by_source["chexpert"].train, by_source["chexpert"].test) == (223_414, 235)


@pytest.fixture(scope="module")
def sample_plans(sample_roots_pristine: dict[str, Path]) -> list:
    return [plan_source(s, sample_roots_pristine[s]) for s in SAMPLE_SOURCES]


def test_sample_dry_run_against_the_paper(sample_plans) -> None:
    nih = next(p for p in sample_plans if p.source == "chestxray14")
    comparison = compare_with_paper(CollectionCounts.from_plans([nih]))
    json.dumps(comparison)  # JSON-ready
    rows = rows_by_source(comparison)
    train = sum(r.split == "train" for r in nih.records)  # the composition takes NIH's train
    assert rows["chestxray14"]["status"] == "differs"
    assert rows["chestxray14"]["ours"]["in_composition"] == train
    assert rows["chestxray14"]["difference"] == train - 86_523
    assert rows["chestxray14"]["ours"]["share_percent"] == 100.0
    for source in PAPER_SOURCES[1:]:
        assert rows[source]["status"] == "not_built"
        assert rows[source]["difference"] is None
        assert rows[source]["ours"]["in_composition"] is None
    assert comparison["totals"]["not_built"] == PAPER_SOURCES[1:]
    images = next(f for f in comparison["summary"] if f["figure"] == "images")
    assert (images["ours"], images["ok"]) == (train, False)


@pytest.fixture(scope="module")
def real_chexpert_plan(tmp_path_factory: pytest.TempPathFactory, real_metadata: Path):
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    root.mkdir()
    shutil.copy(real_metadata / "chexpert_train.csv.gz", root / "train.csv.gz")
    return plan_source("chexpert", root)


def test_real_chexpert_dry_run_matches_the_paper(real_chexpert_plan, sample_plans) -> None:
    nih = next(p for p in sample_plans if p.source == "chestxray14")
    counts = CollectionCounts.from_plans([real_chexpert_plan, nih])
    comparison = compare_with_paper(counts, "paper-2023")
    rows = rows_by_source(comparison)
    chexpert = rows["chexpert"]
    assert chexpert["paper"]["in_machex"] == chexpert["ours"]["in_composition"] == 191_027
    assert (chexpert["difference"], chexpert["status"]) == (0, "match")
    assert "LL" in chexpert["note"] and "191,010" in chexpert["note"]
    assert rows["chestxray14"]["status"] == "differs"
    nih_train = sum(r.split == "train" for r in nih.records)  # the sample's train images
    assert rows["chestxray14"]["difference"] == nih_train - 86_523
    assert [s for s in PAPER_SOURCES if rows[s]["status"] == "not_built"] == PAPER_SOURCES[2:]
    totals = comparison["totals"]
    assert totals["ours_in_composition"] == 191_027 + nih_train
    assert totals["paper_in_machex"] == 651_471
    assert totals["difference_of_built"] == nih_train - 86_523


@pytest.fixture(scope="module")
def built_sample(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    out = tmp_path_factory.mktemp("built")
    for source in SAMPLE_SOURCES:
        build_source(source, sample_roots_pristine[source], out, BuildOptions(workers=1))
    return out


def test_manifest_counts_agree_with_plan_counts(built_sample: Path, sample_plans) -> None:
    built = CollectionCounts.from_manifests(built_sample)
    planned = CollectionCounts.from_plans(sample_plans)
    assert built == planned
    root = next(p.root for p in sample_plans if p.source == "chestxray14")
    listed = (root / "train_val_list.txt").read_text().split()
    assert built.images_by_split["chestxray14"]["train"] == len(listed)
    assert built.boxed_images["chestxray14"] > 0  # the sample has NIH boxes
    assert built.labelled == {s: sum(n.values()) for s, n in built.images_by_split.items()}
    assert compare_with_paper(built) == compare_with_paper(planned)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_is_a_png_of_the_documented_size(built_sample: Path, tmp_path: Path) -> None:
    assert PIXELS == (1600, 1000)
    path = plot_collection(built_sample, tmp_path / "figures" / "machex.png")
    assert png_size(path) == PIXELS


def test_plot_of_one_source_without_ages(sample_roots: dict[str, Path], tmp_path: Path) -> None:
    root = sample_roots["chexpert"]
    for name in ("train.csv", "valid.csv"):
        frame = pd.read_csv(root / name, dtype=str, keep_default_na=False)
        frame["Age"] = ""
        frame.to_csv(root / name, index=False)
    out = tmp_path / "out"
    build_source("chexpert", root, out, BuildOptions(workers=1))
    assert load_manifest(out, "images")["age"].isna().all()
    assert png_size(plot_collection(out, tmp_path / "one.png")) == PIXELS


def test_plot_of_nothing_built_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        plot_collection(tmp_path, tmp_path / "none.png")
