"""The FID Inception port against torch-fidelity's outputs on ``fid-inception`` (random
4-bit weights in the standard file's layout), and FID / KID against the reference values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cheff.eval.generative import fid_from_features, frechet_distance, kid_from_features
from cheff.models.inception import FEATURES, FIDInceptionV3, tf1_resize

DEFAULT_FID_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fid-inception"


def fid_dir() -> Path:
    folder = Path(os.environ.get("CHEFF_FID_DIR", DEFAULT_FID_DIR))
    if not (folder / "io.safetensors").is_file():
        pytest.skip(f"needs the FID Inception fixture {folder} (set CHEFF_FID_DIR)")
    return folder


def dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """FORMAT.md section 5: packed 4-bit weights times a power-of-two scale."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / "random_inception_q4.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        for key in keys:
            if key.endswith(".scale"):
                continue
            tensor = handle.get_tensor(key)
            if not key.endswith(".q4"):
                out[key] = tensor
                continue
            name = key.removesuffix(".q4")
            shape = tuple(int(v) for v in metadata[f"shape.{name}"].split(","))
            packed = tensor.to(torch.int16)
            values = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1) - 8
            count = math.prod(shape)
            scale = handle.get_tensor(f"{name}.scale")
            out[name] = values[:count].reshape(shape).to(torch.float32) * scale
    return out


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory):
    from safetensors.torch import load_file

    folder = fid_dir()
    weights = tmp_path_factory.mktemp("inception") / "pt_inception-fixture.pth"
    torch.save(dequantised(folder), weights)  # through the real file's loading path
    model = FIDInceptionV3.from_file(weights)
    return model, load_file(str(folder / "io.safetensors")), folder, weights


def test_parity_inception_resize(fixture) -> None:
    _, data, _, _ = fixture
    for i in range(6):
        resized = tf1_resize(data[f"input.{i}"].float())
        assert (resized - data["resized"][i : i + 1]).abs().max() <= 0.01, i


def test_parity_inception_features(fixture) -> None:
    model, data, _, _ = fixture
    with torch.no_grad():
        for i in range(6):
            out = model(data[f"input.{i}"], FEATURES)
            for name in FEATURES:
                reference = data[f"feat.{name}"][i : i + 1]
                error = (out[name] - reference).abs().max().item()
                assert error <= 1e-3 * reference.abs().max().item(), (i, name, error)


@pytest.mark.parametrize("pair", ["a", "b"])
def test_parity_inception_fid_and_kid(fixture, pair: str) -> None:
    _, data, folder, _ = fixture
    reference = json.loads((folder / "reference.json").read_text())["metrics"][pair]
    x, y = data[f"metric.{pair}.x"].numpy(), data[f"metric.{pair}.y"].numpy()
    assert fid_from_features(x, y) == pytest.approx(reference["fid_torch_fidelity"], rel=1e-6)
    full = kid_from_features(x, y, subsets=1, subset_size=len(x))
    assert full.mean == pytest.approx(reference["kid_full_mean"], rel=1e-4)
    drawn = kid_from_features(x, y, subsets=10, subset_size=100, seed=2020)
    assert drawn.mean == pytest.approx(reference["kid_subsets10_size100_seed2020_mean"], rel=1e-4)
    assert drawn.std == pytest.approx(reference["kid_subsets10_size100_seed2020_std"], rel=1e-4)
    assert abs(fid_from_features(x, x)) < 1e-9


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Covariances with one eigenbasis: tr((S1 S2)^1/2) = sum sqrt(l1 l2).
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    l1, l2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1, s2 = basis @ np.diag(l1) @ basis.T, basis @ np.diag(l2) @ basis.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-4)


def test_identical_sets_give_zero() -> None:
    """Pool3-like features (non-negative, 2048 wide), 1000 images. The unbiased KID of a set
    with itself is -2 (mean diagonal - mean off-diagonal kernel) / m, not exactly 0; at the
    default subset size of 1000 it is below 1e-3."""
    x = np.random.default_rng(1).uniform(size=(1000, 2048)).astype(np.float32)
    assert abs(fid_from_features(x, x)) < 1e-3
    a = kid_from_features(x, x, subsets=2, seed=1)
    b = kid_from_features(x, x, subsets=2, seed=7)
    assert a.subset_size == 1000 and abs(a.mean) < 1e-3
    assert a.mean == pytest.approx(b.mean, rel=1e-9) and a.std < 1e-12  # whole-set subsets


def test_cli_eval_fid_on_folders_and_a_collection(
    fixture, training_collection: Path, tmp_path: Path
) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    weights = fixture[3]
    rng = np.random.default_rng(0)
    for name, shift in (("real", 0), ("fake", 40)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(4):
            pixels = np.clip(rng.normal(120 + shift, 40, (64, 64)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    args = ["eval", "fid", "--inception-weights", str(weights), "--fake", str(tmp_path / "fake")]
    result = CliRunner().invoke(app, [*args, "--real", str(tmp_path / "real"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["n_real"] == document["n_fake"] == 4 and document["fid"] > 0
    assert document["precision"] is not None and document["protocol"]["kid"]["subset_size"] == 4
    assert (tmp_path / "fake" / "fid.json").is_file()
    itself = [*args[:-2], "--fake", str(tmp_path / "real"), "--real", str(tmp_path / "real")]
    same = CliRunner().invoke(app, [*itself, "--json"])
    assert same.exit_code == 0 and abs(json.loads(same.stdout)["fid"]) < 1e-3  # a set vs itself

    from conftest import TRAINING_HOLDOUT

    result = CliRunner().invoke(app, [*args, "--real", str(training_collection), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["real"]["holdout"] == TRAINING_HOLDOUT and document["n_real"] == 2
    assert document["real"]["image_size"] == 64 and document["precision"] is None
    missing = CliRunner().invoke(
        app,
        [
            *args[:2],
            "--inception-weights",
            str(tmp_path / "x.pth"),
            "--fake",
            str(tmp_path / "fake"),
            "--real",
            str(tmp_path / "real"),
        ],
    )
    assert missing.exit_code == 2 and "docs/weights.md" in missing.output


def test_eval_fid_with_a_custom_extractor(tmp_path: Path) -> None:
    from cxr_extractor import TinyExtractor
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    torch.manual_seed(0)
    weights = tmp_path / "cxr.pth"
    torch.save(TinyExtractor().state_dict(), weights)
    write_noise_folders(tmp_path, count=5, seed=0)
    args = ["eval", "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake")]
    args += ["--extractor", "cxr_extractor:build", "--inception-weights", str(weights)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["protocol"]["network"] == "cxr_extractor:build"
    assert document["protocol"]["standard_weights"] is None
    assert document["comparable_with_published"] is False
    assert document["protocol"]["feature"] == "8 wide" and document["n_fake"] == 5
    bad = CliRunner().invoke(app, [*args[:-4], "--extractor", "no_such_module:build"])
    assert bad.exit_code == 2 and "no_such_module" in bad.output


def test_eval_fid_records_the_weights_hash_and_flags_other_weights(
    fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """fid.json records the weights file's SHA-256; the fixture's random weights are not the
    standard file, so the run goes on with a warning and the JSON says the scores are not
    comparable with published FIDs (and does not claim the TF 2015-12-05 weights)."""
    from typer.testing import CliRunner

    from cheff.eval import fid
    from cheff.latents import file_sha256
    from cli.cheff_cli import app

    weights = fixture[3]
    digest = file_sha256(weights)
    write_noise_folders(tmp_path, count=4, seed=1)
    args = ["eval", "fid", "--inception-weights", str(weights)]
    args += ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake")]
    with caplog.at_level("WARNING", logger="cheff.eval.fid"):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "not comparable with published FIDs" in result.output
    assert any("not the standard" in r.getMessage() for r in caplog.records)
    document = json.loads((tmp_path / "out" / "fid.json").read_text())
    protocol = document["protocol"]
    assert protocol["weights_sha256"] == digest and protocol["standard_weights"] is False
    assert protocol["standard_weights_sha256"] == fid.standard_inception_sha256()
    assert fid.standard_inception_sha256().startswith("6726825d")
    assert "TF 2015-12-05 weights" not in protocol["network"]
    assert document["comparable_with_published"] is False
    assert digest in document["not_comparable_because"]

    # The standard file (its digest patched to the fixture's): comparable, no warning.
    monkeypatch.setattr(fid, "standard_inception_sha256", lambda: digest)
    caplog.clear()
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "std"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["protocol"]["standard_weights"] is True
    assert document["comparable_with_published"] is True
    assert document["not_comparable_because"] is None
    assert "TF 2015-12-05 weights" in document["protocol"]["network"]
    assert not any("not the standard" in r.getMessage() for r in caplog.records)


def write_noise_folders(folder: Path, count: int, seed: int) -> None:
    """``folder/real`` and ``folder/fake``, each with ``count`` 48 px noise PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("real", "fake"):
        (folder / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
