"""Precision and recall (k-NN manifolds) on Gaussian sets whose answer is known, and the
memorisation search finding a planted copy of a training image."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cheff.eval.generative import precision_recall


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def test_the_same_distribution_has_high_precision_and_recall() -> None:
    result = precision_recall(_gaussian(600, 8, 0), _gaussian(600, 8, 1))
    assert result.precision > 0.8 and result.recall > 0.8 and result.k == 3


def test_a_collapsed_generator_is_precise_without_recall() -> None:
    result = precision_recall(_gaussian(600, 8, 0), _gaussian(600, 8, 1, scale=0.2))
    assert result.precision > 0.95 and result.recall < 0.2


def test_a_far_generator_has_neither() -> None:
    result = precision_recall(_gaussian(600, 8, 0), _gaussian(600, 8, 1, shift=20.0))
    assert result.precision == 0.0 and result.recall == 0.0


def test_precision_recall_needs_more_rows_than_k() -> None:
    with pytest.raises(ValueError, match="more than k rows"):
        precision_recall(_gaussian(3, 4, 0), _gaussian(10, 4, 1))


def test_memorization_finds_a_planted_copy(training_collection, ae_path, tmp_path) -> None:
    import torch
    from conftest import TRAINING_HOLDOUT
    from PIL import Image
    from typer.testing import CliRunner

    from cli.cheff_cli import app
    from machex import MaCheX

    size = 64  # the AE's 256 costs a minute on a CPU for nothing more
    training = MaCheX(training_collection, splits=None, image_size=size, with_labels=False)
    held = MaCheX(training_collection, splits=TRAINING_HOLDOUT, image_size=size)
    fakes = tmp_path / "fakes"
    fakes.mkdir()

    def save(image: torch.Tensor, name: str) -> None:
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(fakes / name)

    planted = training[5]
    save(planted["image"], "copy.png")
    save(held[0]["image"], "held_out.png")
    rng = np.random.default_rng(0)
    for i in range(2):
        save(torch.from_numpy(rng.uniform(size=(1, size, size)).astype(np.float32)), f"n{i}.png")

    result = CliRunner().invoke(
        app,
        ["eval", "memorization", "--real", str(training_collection), "--fake", str(fakes)]
        + ["--ae", str(ae_path), "--k", "3", "--device", "cpu", "--holdout", TRAINING_HOLDOUT]
        + ["--image-size", str(size)],
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(fakes / "neighbours.csv")
    first = rows[rows["rank"] == 1].set_index("fake")
    assert first.loc["copy.png", "key"] == planted["key"]
    assert first.loc["copy.png", "distance"] < 1e-3
    assert first["distance"].idxmin() == "copy.png"
    assert first.loc["held_out.png", "key"] != held[0]["key"]  # the held-out set is left out
    assert len(rows) == 4 * 3 and rows.groupby("fake")["distance"].is_monotonic_increasing.all()
    summary = json.loads((fakes / "memorization.json").read_text())
    assert summary["n_real"] == len(training) - 2 and summary["nearest_distance"]["below_0.01"] >= 1
    assert (fakes / "closest_pairs.png").is_file()
    again = CliRunner().invoke(
        app,
        ["eval", "memorization", "--real", str(training_collection), "--fake", str(fakes)]
        + ["--ae", str(ae_path), "--k", "1", "--device", "cpu", "--holdout", TRAINING_HOLDOUT]
        + ["--image-size", str(size)],
    )
    assert again.exit_code == 0, again.output  # its own closest_pairs.png is no fake
    summary = json.loads((fakes / "memorization.json").read_text())
    assert summary["n_fake"] == 4 and list(summary["protocol"]["fake_left_out"]) == [
        "closest_pairs.png"
    ]
    assert summary["protocol"]["limit"] is None and summary["protocol"]["draw"] is None


def test_memorization_searches_only_the_composition(training_collection, ae_path, tmp_path):
    """With --composition the training images are the composition's (source, split) pairs less
    the held-out set: a copy of a ChestX-ray14 test image (outside paper-2023) is not found."""
    import torch
    from conftest import TRAINING_HOLDOUT
    from PIL import Image
    from typer.testing import CliRunner

    from cli.cheff_cli import app
    from machex import MaCheX
    from machex.tables import load_composition

    size = 64
    everything = MaCheX(training_collection, splits=None, image_size=size, with_labels=False)
    composed = MaCheX(
        training_collection,
        splits=None,
        composition="paper-2023",
        exclude_holdout=TRAINING_HOLDOUT,
        image_size=size,
        with_labels=False,
    )
    held = set(MaCheX(training_collection, splits=TRAINING_HOLDOUT).manifest["key"])
    manifest = everything.manifest.reset_index(drop=True)
    pairs = set(load_composition("paper-2023"))
    inside = [(s, p) in pairs for s, p in zip(manifest["source"], manifest["split"])]
    outside = [i for i, ok in enumerate(inside) if not ok and manifest["key"][i] not in held]
    kept = [i for i, ok in enumerate(inside) if ok and manifest["key"][i] not in held]
    assert outside and kept and len(composed) == len(kept) < len(everything) - len(held)
    fakes = tmp_path / "fakes"
    fakes.mkdir()

    def save(image: torch.Tensor, name: str) -> None:
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(fakes / name)

    excluded, planted = everything[outside[0]], everything[kept[0]]
    save(excluded["image"], "excluded.png")  # e.g. ChestX-ray14 test: not paper-2023
    save(planted["image"], "copy.png")

    def run(*extra: str) -> pd.DataFrame:
        result = CliRunner().invoke(
            app,
            ["eval", "memorization", "--real", str(training_collection), "--fake", str(fakes)]
            + ["--ae", str(ae_path), "--k", "3", "--device", "cpu", "--holdout", TRAINING_HOLDOUT]
            + ["--image-size", str(size), *extra],
        )
        assert result.exit_code == 0, result.output
        rows = pd.read_csv(fakes / "neighbours.csv")
        return rows[rows["rank"] == 1].set_index("fake")

    first = run()  # the default: every split, so the excluded split's image is found
    assert first.loc["excluded.png", "key"] == excluded["key"]
    assert json.loads((fakes / "memorization.json").read_text())["protocol"]["composition"] is None
    first = run("--composition", "paper-2023")
    assert first.loc["copy.png", "key"] == planted["key"]
    assert first.loc["copy.png", "distance"] < 1e-3
    assert first.loc["excluded.png", "key"] != excluded["key"]
    rows = pd.read_csv(fakes / "neighbours.csv")
    assert set(rows["key"]) <= set(composed.manifest["key"])
    summary = json.loads((fakes / "memorization.json").read_text())
    assert summary["n_real"] == len(composed) and summary["n_fake"] == 2
    assert summary["protocol"]["composition"] == "paper-2023"
    assert summary["protocol"]["excluded_holdout"] == TRAINING_HOLDOUT
    unknown = CliRunner().invoke(
        app,
        ["eval", "memorization", "--real", str(training_collection), "--fake", str(fakes)]
        + ["--ae", str(ae_path), "--device", "cpu", "--composition", "paper-2024"],
    )
    assert unknown.exit_code == 2 and "unknown composition 'paper-2024'" in unknown.output


def _cheff_samples(folder, count: int, size: int, seed: int = 0) -> None:
    """What ``cheff sample`` writes: PNGs with provenance, then its grid."""
    import torch

    from cheff.pipeline import save_grid, save_images

    images = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))
    save_images(images, folder, text={"cheff:synthetic": "true"})
    save_grid(images, folder / "grid.png")


def test_fid_counts_only_the_samples_and_reads_reals_at_their_size(
    training_collection, tmp_path
) -> None:
    """The grid (sorted first, 138 px for 12 samples of 32) was a fake and set the size."""
    from cheff.eval.fid import collection_batches, evaluate_fid

    fake = tmp_path / "fk"
    _cheff_samples(fake, 12, 32)
    (fake / "grid_00012.png").write_bytes((fake / "grid.png").read_bytes())
    result = evaluate_fid(
        training_collection, fake, None, extractor="cxr_extractor:build", device="cpu"
    )
    assert result["n_fake"] == 12 and result["real"]["image_size"] == 32
    assert sorted(result["fake_left_out"]) == ["grid.png", "grid_00012.png"]
    assert result["real"]["draw"] is None  # every held-out image
    # --n below the held-out set's size: the draw is returned for fid.json's real.draw
    batches, count, _, draw = collection_batches(training_collection, None, 32, 1, 4)
    assert count == 1 and sum(len(batch) for batch in batches) == 1
    assert draw == {"drawn": 1, "of": 2, "seed": 0, "how": "uniform without replacement"}


def test_another_generators_images_count_but_cheffs_figures_do_not(tmp_path, caplog) -> None:
    from PIL import Image

    from cheff.eval.fid import list_samples

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "grid.png", "closest_pairs.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / name)
    samples, left_out = list_samples(tmp_path)
    assert [path.name for path in samples] == ["a.png", "b.jpg"]
    assert set(left_out) == {"grid.png", "closest_pairs.png"}
    # Among cheff's samples, an image without provenance is left out, and said so.
    cheff = tmp_path / "cheff"
    _cheff_samples(cheff, 3, 16)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(cheff / "x.png")
    with caplog.at_level("WARNING", logger="cheff.eval.fid"):
        samples, left_out = list_samples(cheff)
    assert len(samples) == 3 and left_out["x.png"].startswith("no cheff:synthetic")
    assert "x.png" in caplog.text and "grid.png" in caplog.text
    figures = tmp_path / "figures"
    figures.mkdir()
    (cheff / "grid.png").rename(figures / "grid.png")
    with pytest.raises(ValueError, match="figures: no generated images"):
        list_samples(figures)


def test_fid_refuses_fakes_of_mixed_sizes(tmp_path) -> None:
    from cheff.eval.fid import evaluate_fid

    for name, size in (("real", 32), ("fake", 32)):
        _cheff_samples(tmp_path / name, 4, size)
    _cheff_samples(tmp_path / "other", 1, 48)
    (tmp_path / "other" / "sample_00000.png").rename(tmp_path / "fake" / "big.png")
    with pytest.raises(ValueError, match=r"not all one size \(32x32: 4 .*; 48x48: 1 \(big.png\)"):
        evaluate_fid(tmp_path / "real", tmp_path / "fake", None, extractor="cxr_extractor:build")


def test_precision_recall_in_blocks_equals_the_whole_matrix(monkeypatch) -> None:
    """Computed a block of rows at a time (the whole 25k x 25k matrix is 5 GB); the result
    does not depend on the block size."""
    from cheff.eval import generative

    real, fake = _gaussian(300, 8, 0), _gaussian(250, 8, 1, scale=0.7)
    whole = precision_recall(real, fake)
    monkeypatch.setattr(generative, "_BLOCK_ROWS", 7)
    assert precision_recall(real, fake) == whole
    assert 0 < whole.precision < 1 and 0 < whole.recall < 1


def test_capped_evaluations_draw_their_images_across_the_set() -> None:
    """Held-out sets and folders come ordered by source: ``--n`` / ``--limit`` draw (seeded)
    instead of taking the first N, which would be one source's."""
    from cheff.eval.subsets import draw_record, drawn_indices

    chosen = drawn_indices(16, 4)
    assert chosen == sorted(chosen) == drawn_indices(16, 4) and len(set(chosen)) == 4
    assert any(i < 8 for i in chosen) and any(i >= 8 for i in chosen)  # both halves
    assert drawn_indices(5, None) == drawn_indices(5, 9) == [0, 1, 2, 3, 4]
    assert draw_record(5, 9) is None and draw_record(16, 4)["seed"] == 0
    with pytest.raises(ValueError, match="at least 1 image"):
        drawn_indices(5, 0)


def _grey_folder(folder, names: list[str], size: int, value: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(folder / name)


def test_fid_on_folders_draws_n_checks_sizes_and_flags_small_samples(
    tmp_path, monkeypatch, caplog
) -> None:
    from cheff.eval import fid

    real, fake = tmp_path / "real", tmp_path / "fake"
    _grey_folder(real, [f"a_{i}.png" for i in range(8)], 32, 20)  # one "source" ...
    _grey_folder(real, [f"b_{i}.png" for i in range(8)], 32, 230)  # ... then another
    _cheff_samples(fake, 6, 32)
    read: list[str] = []
    batches = fid.folder_batches

    def recording(paths, batch_size):
        read.extend(p.name for p in paths)
        return batches(paths, batch_size)

    monkeypatch.setattr(fid, "folder_batches", recording)
    with caplog.at_level("WARNING", logger="cheff.eval.fid"):
        result = fid.evaluate_fid(real, fake, None, extractor="cxr_extractor:build", n=4)
    reals = [name for name in read if name[0] in "ab"]
    assert len(reals) == 4 and {name[0] for name in reals} == {"a", "b"}
    assert result["real"]["draw"] == {
        "drawn": 4,
        "of": 16,
        "seed": 0,
        "how": "uniform without replacement",
    }
    assert result["fake_draw"]["of"] == 6 and result["n_fake"] == 4
    assert "fewer than the 8 features" in result["fid_small_sample"]
    assert "biased upwards" in caplog.text

    for bad in (0, -2):
        with pytest.raises(ValueError, match="--n must be at least 1"):
            fid.evaluate_fid(real, fake, None, extractor="cxr_extractor:build", n=bad)
    with pytest.raises(ValueError, match="--image-size is for a collection"):
        fid.evaluate_fid(real, fake, None, extractor="cxr_extractor:build", image_size=32)
    _grey_folder(real, ["c_big.png"], 48, 100)  # a real folder of two sizes is refused
    with pytest.raises(ValueError, match=r"not all one size .*c_big.png"):
        fid.evaluate_fid(real, fake, None, extractor="cxr_extractor:build")
    (real / "c_big.png").unlink()
    other = tmp_path / "other"
    _cheff_samples(other, 6, 16)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cheff.eval.fid"):
        fid.evaluate_fid(real, other, None, extractor="cxr_extractor:build")
    assert "the real images are 32 px, the fakes 16 px" in caplog.text


def test_unreadable_images_are_errors_naming_the_file(tmp_path) -> None:
    """A truncated PNG (an interrupted run), a floating-point TIFF or negative values: a
    ValueError naming the file (the CLI reports those), never a silent black image."""
    from PIL import Image

    from cheff.eval.fid import read_grey

    whole = tmp_path / "whole.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot read the image"):
        read_grey(cut)
    floats = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(floats)
    with pytest.raises(ValueError, match=r"float\.tif: .*floating-point image"):
        read_grey(floats)
    signed = tmp_path / "signed.tif"
    Image.fromarray(np.full((8, 8), -5, dtype=np.int32)).save(signed)
    with pytest.raises(ValueError, match=r"signed\.tif: .*negative pixel values"):
        read_grey(signed)
    assert read_grey(whole).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("k", [0, -1])
def test_memorization_needs_at_least_one_neighbour(tmp_path, k) -> None:
    from cheff.eval.memorization import nearest_training_images

    with pytest.raises(ValueError, match="k must be at least 1"):
        nearest_training_images(lambda x: x, tmp_path, tmp_path, k=k)
