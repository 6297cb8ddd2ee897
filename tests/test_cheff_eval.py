"""``cheff.eval``: the per-image metrics against closed forms and an independent SSIM, and the
reconstruction evaluation end to end on a small built MaCheX (an identity "model" and a tiny
random autoencoder), its outputs, and the choice of held-out set."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cheff.config import PRESETS
from cheff.eval import metrics
from cheff.eval.recon import (
    PAPER_TABLE2,
    HoldoutChoiceError,
    ReconOptions,
    evaluate_recon,
    from_model_output,
    resolve_holdout,
    score_batch,
    to_model_input,
    worst_png_size,
    write_json,
    write_outputs,
)
from cheff.eval.subsets import drawn_indices
from cheff.models import AutoencoderKL
from machex import MaCheX
from machex.build import BuildOptions, build_source
from machex.holdout import make_holdout

SOURCES = ("chexpert", "vindr")
HOLDOUT = "eval-6"
HOLDOUT_SIZE = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    """Two sample sources built, with one held-out set of 6 images (never modified)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    for source in SOURCES:
        build_source(source, sample_roots_pristine[source], out, BuildOptions(workers=1))
    make_holdout(out, HOLDOUT, HOLDOUT_SIZE, by="image")
    return out


def reference_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM written out (Wang et al. 2004): separable 11-tap Gaussian (sigma 1.5) on images
    reflect-padded by 5, so the map has every pixel (torchmetrics' convention), per-image mean."""
    taps = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(taps**2) / (2 * 1.5**2))
    g = g / g.sum()
    channels = x.shape[1]
    row = g.view(1, 1, 1, 11).repeat(channels, 1, 1, 1)
    col = g.view(1, 1, 11, 1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (5, 5, 5, 5), mode="reflect")
        return F.conv2d(F.conv2d(t, row, groups=channels), col, groups=channels)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1)


def smooth_random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random images with structure at several scales (pure noise makes SSIM trivially ~0)."""
    coarse = torch.rand((shape[0], shape[1], shape[2] // 8, shape[3] // 8), generator=generator)
    up = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
    return (0.8 * up + 0.2 * torch.rand(shape, generator=generator)).double()


# -- metrics -----------------------------------------------------------------------------


def test_identical_images_score_perfectly() -> None:
    x = torch.rand(3, 1, 32, 40, generator=torch.Generator().manual_seed(0))
    scores = metrics.image_metrics(x, x.clone())
    assert scores["mse"].tolist() == [0.0, 0.0, 0.0]
    assert torch.isposinf(scores["psnr"]).all()
    torch.testing.assert_close(scores["ssim"], torch.ones(3, dtype=torch.float64))
    summary = metrics.summarize(scores["psnr"])
    assert summary == {
        "mean": None,
        "std": None,
        "min": None,
        "max": None,
        "n": 0,
        "n_inf": 3,
        "n_nan": 0,
    }


def test_psnr_of_gaussian_noise_matches_the_closed_form() -> None:
    sigma = 0.02  # around mid-grey 0.5, clipping would need a 25-sigma draw
    generator = torch.Generator().manual_seed(1)
    target = torch.full((4, 1, 128, 128), 0.5, dtype=torch.float64)
    pred = target + sigma * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    assert torch.equal(pred, pred.clamp(0, 1))

    errors = metrics.mse(pred, target)
    exact = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(errors, exact, rtol=0, atol=0)
    # the sample variance of 16,384 draws: relative standard error sqrt(2 / n) ~ 1.1 %
    torch.testing.assert_close(errors, torch.full_like(errors, sigma**2), rtol=0.05, atol=0)
    values = metrics.psnr(pred, target)
    torch.testing.assert_close(values, 10 * torch.log10(1 / errors), rtol=0, atol=1e-12)
    closed_form = 10 * math.log10(1 / sigma**2)  # 33.98 dB
    assert values.sub(closed_form).abs().max() < 0.25
    # data_range scales the peak: range 2 adds 20 log10(2) dB
    torch.testing.assert_close(
        metrics.psnr(pred, target, data_range=2.0), values + 20 * math.log10(2.0)
    )


def test_ssim_agrees_with_an_independent_implementation() -> None:
    generator = torch.Generator().manual_seed(2)
    target = smooth_random((3, 1, 48, 40), generator)
    pred = (target + 0.05 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    ours = metrics.ssim(pred, target)
    assert ours.shape == (3,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference_ssim(pred, target), rtol=0, atol=1e-10)
    assert float(ours.min()) > 0.3 and float(ours.max()) < 0.99  # a meaningful, not edge, case
    # several channels: the map's mean over channels and pixels
    pair = smooth_random((2, 3, 32, 32), generator), smooth_random((2, 3, 32, 32), generator)
    torch.testing.assert_close(metrics.ssim(*pair), reference_ssim(*pair), rtol=0, atol=1e-10)


def test_ssim_and_psnr_decrease_with_noise() -> None:
    generator = torch.Generator().manual_seed(3)
    target = smooth_random((1, 1, 64, 64), generator) * 0.5 + 0.25
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float64)
    ssims, psnrs = [], []
    for sigma in (0.0, 0.005, 0.02, 0.05, 0.1):
        pred = (target + sigma * noise).clamp(0, 1)
        ssims.append(float(metrics.ssim(pred, target)))
        psnrs.append(float(metrics.psnr(pred, target)))
    assert ssims[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in zip(ssims, ssims[1:]))
    assert all(a > b for a, b in zip(psnrs, psnrs[1:]))


def test_metrics_compute_in_float64_on_cpu_whatever_the_input_dtype() -> None:
    generator = torch.Generator().manual_seed(4)
    target = torch.rand(2, 1, 32, 32, generator=generator)
    pred = (target + 0.01).clamp(0, 1)
    low = metrics.image_metrics(pred.bfloat16(), target.bfloat16())
    high = metrics.image_metrics(pred.bfloat16().double(), target.bfloat16().double())
    for name in ("mse", "psnr", "ssim"):
        assert low[name].dtype == torch.float64
        torch.testing.assert_close(low[name], high[name], rtol=0, atol=0)


def test_metrics_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        metrics.mse(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        metrics.ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))


def test_summary_counts_inf_and_nan_and_averages_psnr_per_image() -> None:
    summary = metrics.summarize(np.array([30.0, 40.0, math.inf, math.nan]))
    assert summary == {
        "mean": 35.0,
        "std": 5.0,
        "min": 30.0,
        "max": 40.0,
        "n": 2,
        "n_inf": 1,
        "n_nan": 1,
    }
    # per-image PSNRs 30 and 40 dB average to 35; the PSNR of their mean MSE is ~32.6
    mean_mse = (1e-3 + 1e-4) / 2
    assert metrics.psnr_of_mean_mse(mean_mse) == pytest.approx(32.596, abs=1e-3)
    assert metrics.psnr_of_mean_mse(0.0) == math.inf
    assert metrics.psnr_of_mean_mse(None) is None


# -- the protocol's model-free steps ---------------------------------------------------------


def test_model_input_and_output_mapping() -> None:
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    inputs = to_model_input(x)
    assert inputs.shape == (2, 3, 8, 8)
    assert torch.equal(inputs[:, 0], inputs[:, 2]) and torch.equal(inputs[:, 0], x[:, 0] * 2 - 1)
    torch.testing.assert_close(from_model_output(inputs), x, rtol=0, atol=1e-7)

    # the channel mean, then the clamp: channels -1, 0, 0.5 -> mean -1/6 -> 5/12
    decoded = torch.tensor([-1.0, 0.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 4, 4).bfloat16()
    out = from_model_output(decoded)
    assert out.shape == (1, 1, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 1, 4, 4), 5 / 12))
    assert from_model_output(torch.full((1, 3, 2, 2), 3.0)).eq(1).all()
    assert from_model_output(torch.full((1, 3, 2, 2), -3.0)).eq(0).all()
    with pytest.raises(ValueError, match="grey"):
        to_model_input(torch.zeros(1, 3, 8, 8))


def test_score_batch_of_a_perfect_reconstruction() -> None:
    x = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(6))
    scores = score_batch(x, x)
    assert scores["mse"].eq(0).all() and torch.isposinf(scores["psnr"]).all()
    torch.testing.assert_close(scores["ssim"], torch.ones(4, dtype=torch.float64))


# -- held-out set ----------------------------------------------------------------------------


def test_resolve_holdout(built: Path, tmp_path: Path) -> None:
    assert resolve_holdout(built) == HOLDOUT  # the only one stored
    assert resolve_holdout(built, HOLDOUT) == HOLDOUT
    with pytest.raises(HoldoutChoiceError, match=f"no held-out set 'nope'; stored: {HOLDOUT}"):
        resolve_holdout(built, "nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HoldoutChoiceError, match="has no held-out set; make one with") as info:
        resolve_holdout(empty)
    assert "machex holdout" in str(info.value) and "--holdout test-25k" in str(info.value)
    assert "holdout='test-25k'" in str(info.value)
    with pytest.raises(HoldoutChoiceError, match="machex holdout .* --name mine"):
        resolve_holdout(empty, "mine")

    several = tmp_path / "several"
    shutil.copytree(built, several)
    make_holdout(several, "other", 3, by="image")
    # A Python caller is told its argument too, not only the command line's option.
    with pytest.raises(
        HoldoutChoiceError,
        match=r"2 held-out sets \(eval-6, other\).*holdout=NAME \(Python\) or --holdout NAME",
    ):
        resolve_holdout(several)
    assert resolve_holdout(several, "other") == "other"


# -- end to end ------------------------------------------------------------------------------


def test_identity_reconstruction_end_to_end(built: Path, tmp_path: Path) -> None:
    """A perfect "autoencoder" through the whole pipeline at the protocol's 256 px."""
    options = ReconOptions(batch_size=4, worst=4, progress=False)
    result = evaluate_recon(lambda x: x, built, options=options)
    assert result.holdout == HOLDOUT and result.n == result.holdout_images == HOLDOUT_SIZE
    expected = MaCheX(built, splits=HOLDOUT, with_labels=False).manifest
    assert list(result.rows["key"]) == list(expected["key"])
    assert result.rows["mse"].max() < 1e-12  # [0,1] -> [-1,1] -> [0,1] in float32
    assert result.rows["ssim"].min() > 1 - 1e-9
    assert result.metrics["psnr"]["n"] + result.metrics["psnr"]["n_inf"] == HOLDOUT_SIZE
    assert result.protocol["image_size"] == 256
    assert [w.original.shape for w in result.worst] == [(256, 256)] * 4

    written = write_outputs(result, tmp_path / "identity")
    with Image.open(written["worst_png"]) as png:
        assert png.size == worst_png_size(4, 256) == (3 * 256 + 8, 14 + 4 * (14 + 256))

    limited = evaluate_recon(
        lambda x: x, built, HOLDOUT, ReconOptions(limit=2, batch_size=4, progress=False)
    )
    assert limited.n == 2 and limited.holdout_images == HOLDOUT_SIZE and limited.limit == 2
    # a seeded draw across the held-out set, not its first two (those are one source's)
    drawn = [expected["key"].iloc[i] for i in drawn_indices(len(expected), 2)]
    assert list(limited.rows["key"]) == drawn and limited.to_dict()["limit_draw"]["seed"] == 0


def test_tiny_autoencoder_end_to_end(built: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ae = AutoencoderKL(PRESETS["tiny"].autoencoder).train()
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    options = ReconOptions(batch_size=4, worst=3, image_size=64, progress=False)
    result = evaluate_recon(ae, built, HOLDOUT, options, checkpoint="ckpt/ae.safetensors")

    assert ae.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())
    assert result.n == HOLDOUT_SIZE and len(result.rows) == HOLDOUT_SIZE
    assert np.isfinite(result.rows[["mse", "psnr", "ssim"]].to_numpy()).all()
    for name in ("mse", "psnr", "ssim"):
        summary = result.metrics[name]
        assert summary["n"] == HOLDOUT_SIZE and summary["n_inf"] == summary["n_nan"] == 0
        assert summary["mean"] == pytest.approx(result.rows[name].mean())
    assert 0 < result.metrics["mse"]["mean"] < 1 and -1 < result.metrics["ssim"]["mean"] < 1
    assert result.metrics["psnr"]["mean"] >= result.metrics["psnr"]["of_mean_mse"]  # Jensen

    # the worst images are the highest-MSE rows, worst first
    top = result.rows.sort_values("mse", ascending=False, kind="stable").head(3)
    assert [w.key for w in result.worst] == list(top["key"])
    assert [w.rank for w in result.worst] == [1, 2, 3]

    # an independent recomputation of the worst image through the model
    worst = result.worst[0]
    dataset = MaCheX(built, splits=HOLDOUT, image_size=64, with_labels=False)
    index = list(dataset.manifest["key"]).index(worst.key)
    x = dataset[index]["image"][None]
    np.testing.assert_array_equal(worst.original, x[0, 0].numpy())
    with torch.no_grad():
        decoded = ae.eval().reconstruct(x.repeat(1, 3, 1, 1) * 2 - 1)
    recon = ((decoded.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
    np.testing.assert_allclose(worst.reconstruction, recon[0, 0].numpy(), atol=1e-5)
    assert worst.mse == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-4)

    written = write_outputs(result, tmp_path / "tiny", per_image="parquet")
    document = json.loads(written["json"].read_text())
    assert document["workflow"] == "ae" and document["holdout"] == HOLDOUT
    assert document["n"] == HOLDOUT_SIZE and document["checkpoint"] == "ckpt/ae.safetensors"
    expected = {"mse": 0.0005, "psnr": 36.80, "ssim": 0.9926}
    assert document["paper"] == PAPER_TABLE2["ae"] == expected
    assert document["device"] == "cpu" and document["dtype"] == "float32"
    protocol = document["protocol"]
    assert protocol["image_size"] == 64 and protocol["data_range"] == 1.0
    assert protocol["value_range"] == [0.0, 1.0] and protocol["channels"] == 1
    assert protocol["ssim"]["kernel_size"] == 11 and protocol["ssim"]["sigma"] == 1.5
    assert document["metrics"]["psnr"]["mean"] == pytest.approx(result.metrics["psnr"]["mean"])
    assert [w["key"] for w in document["worst"]] == [w.key for w in result.worst]
    assert document["files"] == {
        "worst_png": "recon_worst.png",
        "per_image": "recon_images.parquet",
    }
    import pandas as pd

    rows = pd.read_parquet(written["per_image"])
    assert list(rows.columns) == ["key", "source", "mse", "psnr", "ssim"]
    assert len(rows) == HOLDOUT_SIZE
    with Image.open(written["worst_png"]) as png:
        assert png.size == worst_png_size(3, 64)
        pixels = np.asarray(png)
    # the first row's original panel is the worst image itself
    top_left = pixels[14 + 14 : 14 + 14 + 64, :64]
    np.testing.assert_allclose(top_left / 255.0, worst.original, atol=0.5 / 255 + 1e-6)


def test_json_is_strict_with_infinite_psnr(built: Path, tmp_path: Path) -> None:
    result = evaluate_recon(
        lambda x: x, built, options=ReconOptions(limit=1, image_size=32, progress=False)
    )
    psnr = {**result.metrics["psnr"], "of_mean_mse": math.inf}
    worst = [dataclasses.replace(result.worst[0], psnr=math.inf, mse=0.0)]
    perfect = dataclasses.replace(result, metrics={**result.metrics, "psnr": psnr}, worst=worst)

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    document = json.loads(write_json(perfect, tmp_path).read_text(), parse_constant=refuse)
    assert document["worst"][0]["psnr"] is None
    assert document["metrics"]["psnr"]["of_mean_mse"] is None


def test_options_and_device_errors(built: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ReconOptions(batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        ReconOptions(limit=0)
    with pytest.raises(ValueError, match="bf16 autocast is for CUDA"):
        evaluate_recon(lambda x: x, built, options=ReconOptions(device="cpu", bf16=True))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            evaluate_recon(lambda x: x, built, options=ReconOptions(device="cuda"))


def test_cli_eval_recon_writes_its_outputs_and_refuses_bad_input(built: Path, tmp_path) -> None:
    from typer.testing import CliRunner

    from cheff.checkpoints import save_autoencoder
    from cli.cheff_cli import app

    torch.manual_seed(0)
    checkpoint = save_autoencoder(AutoencoderKL(PRESETS["tiny"].autoencoder), tmp_path / "ae.st")
    runner = CliRunner()
    args = ["eval", "recon", "--data", str(built), "--ae", str(checkpoint), "-j", "0"]
    result = runner.invoke(app, [*args, "--limit", "2", "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["n"] == 2 and document["holdout"] == HOLDOUT
    assert document["checkpoint"] == str(checkpoint)
    assert {"recon.json", "recon_worst.png"} <= {p.name for p in (tmp_path / "r").iterdir()}
    assert document["protocol"]["image_size"] == 256
    small = [*args, "--limit", "1", "--image-size", "32", "--out", str(tmp_path / "s"), "--json"]
    result = runner.invoke(app, small)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["protocol"]["image_size"] == 32
    for extra, message in [
        (["--workflow", "sr", "--sr", str(checkpoint), "--image-size", "32"], "ae workflow"),
        (["--holdout", "nope"], "no held-out set 'nope'"),
        (["--workflow", "sr"], "--workflow sr needs --sr CKPT"),
        (["--workflow", "x"], "choose from ae, sr, full"),
        (["--device", "cpu", "--bf16"], "bf16"),
    ]:
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    result = runner.invoke(app, [*args[:4], "--ae", str(tmp_path / "absent.pt")])
    assert result.exit_code == 2 and "no such checkpoint" in result.output


# -- the super-resolution workflows ------------------------------------------------------------


def _upscaler():
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig
    from cheff.upscale import Upscaler

    torch.manual_seed(0)
    unet = SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1, 2), attention_layers=2))
    return Upscaler(SuperResolution(unet), size=64, device="cpu")


def test_sr_and_full_workflows_score_the_paper_chains(built: Path) -> None:
    from cheff.eval.recon import evaluate_workflow, sr_workflow
    from cheff.glue import official_glue
    from machex import MaCheX, resize

    torch.manual_seed(1)
    ae = AutoencoderKL(PRESETS["tiny"].autoencoder).eval()
    upscaler = _upscaler()
    options = ReconOptions(batch_size=4, worst=2, progress=False)
    kwargs = {"image_size": 64, "low_size": 16, "steps": 2, "seed": 3}
    full = evaluate_workflow(sr_workflow(upscaler, ae, **kwargs), built, HOLDOUT, options)
    assert full.workflow == "full" and full.n == HOLDOUT_SIZE
    assert full.paper == PAPER_TABLE2["full"] and set(full.paper) == {"base", "fine"}
    assert full.protocol["sr"]["steps"] == 2 and full.protocol["image_size"] == 64
    assert "glue" in full.protocol["workflow"]

    # Image 4 by hand: the same chain, its noise from the 'sr' stream of number 4.
    x = MaCheX(built, splits=HOLDOUT, image_size=64, with_labels=False)[4]["image"][None]
    with torch.no_grad():
        low = official_glue(ae.reconstruct(resize(x, 16).expand(-1, 3, -1, -1) * 2 - 1))
    high = upscaler(low, seed=3, start=4, steps=2, progress=False)
    expected = float(((high - x) ** 2).mean())
    assert full.rows["mse"][4] == pytest.approx(expected, rel=1e-5)

    one_by_one = ReconOptions(batch_size=1, worst=0, progress=False)
    sr = evaluate_workflow(sr_workflow(upscaler, None, **kwargs), built, HOLDOUT, options)
    again = evaluate_workflow(sr_workflow(upscaler, None, **kwargs), built, HOLDOUT, one_by_one)
    assert sr.workflow == "sr" and "latent" not in sr.protocol
    np.testing.assert_allclose(sr.rows["mse"], again.rows["mse"], rtol=1e-5)
    assert not np.allclose(sr.rows["mse"], full.rows["mse"])


def test_cli_eval_recon_full_at_1024(built: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cheff.checkpoints import save_autoencoder, save_sr
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig
    from cli.cheff_cli import app

    torch.manual_seed(0)
    ae = save_autoencoder(AutoencoderKL(PRESETS["tiny"].autoencoder), tmp_path / "ae.st")
    unet = SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1, 1, 1, 1, 2, 2), attention_layers=3))
    sr = save_sr(SuperResolution(unet), tmp_path / "sr.st")
    args = ["eval", "recon", "--workflow", "full", "--data", str(built), "--ae", str(ae)]
    args += ["--sr", str(sr), "--limit", "1", "--sr-steps", "1", "-j", "0", "-q"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "paper base: MSE 0.0039, PSNR 24.05" in result.output
    assert "paper fine: MSE 0.0026, PSNR 25.77" in result.output
    assert "not the paper's Table 2 protocol" not in result.output
    document = json.loads((tmp_path / "r" / "recon.json").read_text())
    assert document["workflow"] == "full" and document["protocol"]["image_size"] == 1024
    assert document["n"] == 1 and document["protocol"]["input_size"] == 256
    assert document["protocol"]["sizes_match_paper"] is True
    assert "released" in document["protocol"]["sizes_from"]


def test_cli_eval_recon_sr_runs_at_the_sizes_the_file_records(built: Path, tmp_path: Path) -> None:
    """An SR trained 16 -> 64 px is evaluated at 16 -> 64, not at the released 256 -> 1024,
    and the JSON and the summary say the paper's numbers are not comparable."""
    from typer.testing import CliRunner

    from cheff.checkpoints import save_autoencoder, save_sr
    from cheff.eval.recon import sr_sizes
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig
    from cli.cheff_cli import app

    torch.manual_seed(0)
    ae = save_autoencoder(AutoencoderKL(PRESETS["tiny"].autoencoder), tmp_path / "ae.st")
    unet = SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1, 2), attention_layers=2))
    sr = save_sr(SuperResolution(unet), tmp_path / "sr.st", image_size="64", low_size="16")
    assert sr_sizes(sr)[:2] == (64, 16)
    for workflow in ("sr", "full"):
        args = ["eval", "recon", "--workflow", workflow, "--data", str(built), "--sr", str(sr)]
        args += ["--ae", str(ae)] if workflow == "full" else []
        args += ["--limit", "2", "--sr-steps", "1", "-j", "0", "-q", "--device", "cpu"]
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / workflow)])
        assert result.exit_code == 0, result.output
        assert "not the paper's Table 2 protocol (16 -> 64 px" in result.output
        assert "not comparable" in result.output
        document = json.loads((tmp_path / workflow / "recon.json").read_text())
        protocol = document["protocol"]
        assert document["workflow"] == workflow and document["n"] == 2
        assert protocol["image_size"] == 64 and protocol["input_size"] == 16
        assert protocol["sizes_match_paper"] is False
        assert protocol["paper_sizes"] == {"image_size": 1024, "input_size": 256}
        assert "recorded in the SR file" in protocol["sizes_from"]
        with Image.open(tmp_path / workflow / "recon_worst.png") as png:
            assert png.size[0] == 3 * 64 + 8  # three 64 px panels
