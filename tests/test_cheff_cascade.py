"""The full cascade on a CPU: LDM -> decode -> glue -> SR to 1024 px, upscaling, provenance.

Random-init tiny models saved in our format (no shared fixture needed): the tiny SDM on the
tiny autoencoder (32 px) and a small SR U-Net. One SR network call at 1024 px costs about
2 s here, so every run uses one SR step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheff.checkpoints import save_ldm, save_sr
from cheff.config import TINY
from cheff.latents import file_sha256
from cheff.models.autoencoder import AutoencoderKL
from cheff.models.ldm import LatentDiffusion
from cheff.models.sr import SuperResolution
from cheff.models.sr_unet import SRUNet, SRUNetConfig
from cheff.models.unet import UNetModel
from cheff.pipeline import Pipeline
from cheff.provenance import read_provenance

SR_CONFIG = SRUNetConfig(dim=8, dim_mults=(1, 1, 1, 1, 1, 2, 2), attention_layers=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cascade")
    torch.manual_seed(0)
    ldm = LatentDiffusion(UNetModel(TINY.train_sdm.model), AutoencoderKL(TINY.autoencoder))
    sr = SuperResolution(SRUNet(SR_CONFIG))
    return {
        "sdm": save_ldm(ldm, folder / "ldm.safetensors"),
        "sr": save_sr(sr, folder / "sr.safetensors"),
    }


def test_the_pipeline_cascade_is_reproducible_per_image(files: dict[str, Path]) -> None:
    pipe = Pipeline.from_checkpoints(files["sdm"], sr=files["sr"], device="cpu", image_size=32)
    both = pipe(2, steps=4, sr_steps=1, return_latents=True, progress=False, batch_size=2)
    assert both.images.shape == (2, 1, 1024, 1024) and both.low_res.shape == (2, 1, 32, 32)
    assert torch.all((both.low_res * 255 - (both.low_res * 255).round()).abs() < 1e-4)  # 8-bit
    second = pipe(1, steps=4, sr_steps=1, start=1, progress=False)
    torch.testing.assert_close(second[0], both.images[1], atol=1e-5, rtol=0)
    run = pipe.last_run
    assert (run["image_size"], run["sr_network_calls"], run["sr_eta"]) == (1024, 1, 0.0)


def test_cli_cascade_writes_1024_pngs_with_provenance(files: dict[str, Path], tmp_path: Path):
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    out = tmp_path / "out"
    args = ["sample", "--cascade", "--sdm", str(files["sdm"]), "--sr", str(files["sr"])]
    args += ["--n", "1", "--steps", "2", "--exact-steps", "--sr-steps", "1", "--seed", "7"]
    args += ["--image-size", "32", "--device", "cpu", "-q", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (png,) = out.glob("sample_*.png")
    with Image.open(png) as image:
        assert image.size == (1024, 1024) and image.mode == "L"
    text = read_provenance(png)
    assert text["cheff:synthetic"] == "true"
    assert text["cheff:sdm_sha256"] == file_sha256(files["sdm"])
    assert text["cheff:sr_sha256"] == file_sha256(files["sr"])
    assert (text["cheff:seed"], text["cheff:index"], text["cheff:sr_steps"]) == ("7", "0", "1")
    assert text["cheff:sampler"] == "ddim" and text["cheff:steps"] == "2"
    # Each stage's noise schedule is recorded (these files store none: the paper's).
    assert text["cheff:schedule"] == "1000 steps, alphas_cumprod[-1] 3.151e-06"
    assert text["cheff:sr_schedule"] == "2000 steps, alphas_cumprod[-1] 6.058e-11"
    (low,) = (out / "32").glob("sample_*.png")  # the folder is named by the LDM's side
    with Image.open(low) as image:
        assert image.size == (32, 32)
    low_text = read_provenance(low)
    assert low_text["cheff:stage"] == "32 px before super-resolution"
    assert (low_text["cheff:image_size"], text["cheff:image_size"]) == ("32", "1024")
    info = json.loads((out / "sample.json").read_text())
    assert info["sr"] == str(files["sr"]) and info["sr_seconds"] > 0

    upscaled = tmp_path / "upscaled"
    args = ["upscale", str(low), "--sr", str(files["sr"]), "--steps", "1", "--size", "1024"]
    result = CliRunner().invoke(app, [*args, "--out", str(upscaled), "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with Image.open(upscaled / low.name) as image:
        assert image.size == (1024, 1024)
        pixels = np.asarray(image)
    assert pixels.std() > 0
    text = read_provenance(upscaled / low.name)
    assert text["cheff:task"] == "upscale" and text["cheff:source_image"] == str(low)
    kept = low.read_bytes()
    args = ["upscale", str(low), "--sr", str(files["sr"]), "--steps", "1", "--out", str(low.parent)]
    result = CliRunner().invoke(app, args)  # into the inputs' folder: the original would go
    assert result.exit_code == 2 and "would replace the input" in result.output
    assert low.read_bytes() == kept

    result = CliRunner().invoke(
        app, ["sample", "--sdm", str(files["sdm"]), "--cascade", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "--cascade needs --sr" in result.output


def test_plain_samples_carry_provenance_too(files: dict[str, Path], tmp_path: Path) -> None:
    from cheff.pipeline import save_images

    pipe = Pipeline.from_checkpoints(files["sdm"], device="cpu", image_size=32)
    images = pipe(2, steps=4, seed=5, progress=False, start=3)
    paths = save_images(images, tmp_path, text=pipe.image_text(), start=3)
    texts = [read_provenance(path) for path in paths]
    assert [t["cheff:index"] for t in texts] == ["3", "4"]
    assert all(t["cheff:synthetic"] == "true" and "cheff:sr_sha256" not in t for t in texts)


def test_cli_inpaint_cascade_gives_1024(files: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(tmp_path / "x.png")
    keep = np.full((32, 32), 255, np.uint8)
    keep[8:24, 8:24] = 0
    Image.fromarray(keep).save(tmp_path / "keep.png")
    args = ["inpaint", "--cascade", "--sdm", str(files["sdm"]), "--sr", str(files["sr"])]
    args += ["--image", str(tmp_path / "x.png"), "--mask", str(tmp_path / "keep.png")]
    args += ["--n", "1", "--steps", "2", "--exact-steps", "--sr-steps", "1", "--image-size", "32"]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "out"), "-q", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    (png,) = (tmp_path / "out").glob("inpaint_*.png")
    with Image.open(png) as image:
        assert image.size == (1024, 1024)
    text = read_provenance(png)
    assert text["cheff:task"] == "inpaint" and text["cheff:synthetic"] == "true"
    info = json.loads((tmp_path / "out" / "inpaint.json").read_text())
    assert info["image"] == str(tmp_path / "x.png") and info["sr_network_calls"] == 1


def test_cli_sample_parts_number_their_files(files: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    args = ["sample", "--sdm", str(files["sdm"]), "--steps", "4", "--image-size", "32", "-q"]
    args += ["--device", "cpu", "--out", str(tmp_path), "--seed", "2"]
    for start in ("0", "2"):
        result = CliRunner().invoke(app, [*args, "--n", "2", "--start", start])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("sample_*.png"))
    assert names == [f"sample_{i:05d}.png" for i in range(4)]
    assert read_provenance(tmp_path / "sample_00003.png")["cheff:index"] == "3"
    assert json.loads((tmp_path / "sample_00002.json").read_text())["start"] == 2
    pipe = Pipeline.from_checkpoints(files["sdm"], device="cpu", image_size=32)
    whole = pipe(4, steps=4, seed=2, progress=False)
    with Image.open(tmp_path / "sample_00003.png") as image:
        part = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
    assert (part - whole[3, 0]).abs().max() <= 1 / 255 + 1e-6  # the same image, 8-bit


def test_the_cascade_never_trips_the_upscalers_input_checks(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Upscaler refuses images outside [0, 1] and non-square ones. The cascade hands it
    the glue of the decoder output (clamped, so always in [0, 1]) and refuses a non-square
    in-painting image up front, before an LDM batch is spent on it."""
    pipe = Pipeline.from_checkpoints(files["sdm"], sr=files["sr"], device="cpu", image_size=32)
    decode = pipe.ldm.decode_latents
    monkeypatch.setattr(pipe.ldm, "decode_latents", lambda z: 50 * decode(z))  # far off [-1, 1]
    out = pipe(1, steps=2, sr_steps=1, progress=False, return_latents=True)
    assert out.images.shape == (1, 1, 1024, 1024)
    assert out.low_res.min() == 0 and out.low_res.max() == 1  # clamped by the glue

    def no_network(*args, **kwargs):
        raise AssertionError("sampled before checking the image")

    monkeypatch.setattr(pipe, "_run", no_network)
    wide = torch.rand(1, 1, 32, 64)
    with pytest.raises(ValueError, match="image 32x64: the cascade's super-resolution .*square"):
        pipe.inpaint(wide, torch.ones(1, 1, 32, 64), steps=2, progress=False)


def test_the_cascade_refuses_an_sr_trained_from_another_size(files: dict[str, Path], tmp_path):
    """Our SR files record the side they upscale from; an LDM sampling at another side would
    feed them images they never saw (the condition resizes any input without a word)."""
    from cheff.checkpoints import load_sr

    trained = save_sr(load_sr(files["sr"]), tmp_path / "sr16.safetensors", low_size="16")
    with pytest.raises(ValueError, match="trained to upscale 16 px images, but .* at 32 px"):
        Pipeline.from_checkpoints(files["sdm"], sr=trained, device="cpu", image_size=32)
    pipe = Pipeline.from_checkpoints(files["sdm"], sr=trained, device="cpu", image_size=16)
    assert pipe.upscaler is not None and pipe.upscaler.low_size == 16
    # In-painting an image of another side would reach the SR only after the LDM's work.
    with pytest.raises(ValueError, match="image 32x32: .* upscales 16 px images; resize"):
        pipe.inpaint(torch.rand(1, 1, 32, 32), torch.ones(1, 1, 32, 32), steps=2, progress=False)


def test_upscale_names_a_missing_sr_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(tmp_path / "in.png")
    missing = tmp_path / "absent.safetensors"
    args = ["upscale", str(tmp_path / "in.png"), "--sr", str(missing)]
    args += ["--out", str(tmp_path / "up")]
    result = CliRunner().invoke(app, [*args, "-q", "--device", "cpu"])
    assert result.exit_code == 2 and f"{missing}: no such checkpoint file" in result.output
