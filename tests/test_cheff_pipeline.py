"""The sampling pipeline: seeds, step counts, samplers, in-painting, PNG files.

Behaviour runs on a tiny random LDM built here (16 px images, 8 px latents), so it needs no
files; the in-painting parity with the official sampler uses the ``ldm_uncond`` fixture and
skips without it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cheff_parity import MULTI_STEP, SINGLE, assert_close, checkpoint, config, fixture, io
from PIL import Image

from cheff.checkpoints import CheckpointError, load_ldm, save_ldm
from cheff.config import AutoencoderConfig
from cheff.diffusion import NoiseSchedule, ddim, ldm_buffers, solver_timesteps
from cheff.models.autoencoder import AutoencoderKL
from cheff.models.ldm import LatentDiffusion
from cheff.models.unet import UNetConfig, UNetModel
from cheff.pipeline import (
    Pipeline,
    Samples,
    image_seed,
    inpaint_latents,
    latent_mask,
    load_image,
    load_mask,
    save_grid,
    save_images,
    to_grey,
)
from cheff.provenance import read_provenance

SIZE = 16  # image side of the tiny model; latents are 3 x 8 x 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run ~50x slower on several threads of a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ldm() -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNetModel(
        UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=())
    )
    ae = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1))
    return LatentDiffusion(unet, ae, scale_factor=1.0).eval()


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(tiny_ldm(), image_size=SIZE, device="cpu")


class Counting:
    """An eps function that counts its calls."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model.eps(x, t)


# ----------------------------------------------------------------------------- sampling


def test_sample_shape_range_and_run_info(pipe) -> None:
    out = pipe(3, seed=1, steps=5, batch_size=2, progress=False, return_latents=True)
    assert isinstance(out, Samples)
    assert out.images.shape == (3, 1, SIZE, SIZE) and out.latents.shape == (3, 3, 8, 8)
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert out.images.min() >= 0 and out.images.max() <= 1
    with torch.no_grad():  # decoded in batches of 2 there, of 3 here
        decoded = to_grey(pipe.ldm.decode_latents(out.latents))
    torch.testing.assert_close(out.images, decoded, atol=1e-5, rtol=0)
    info = pipe.last_run
    assert info["sampler"] == "ddim" and info["eta"] == 1.0 and info["steps"] == 5
    assert info["network_calls"] == 5 and info["n"] == 3 and info["seed"] == 1
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["seconds"] >= 0


def test_seeds_reproduce_and_batch_size_does_not_matter(pipe) -> None:
    kwargs = {"steps": 4, "progress": False}
    first = pipe(3, seed=7, batch_size=3, **kwargs)
    assert torch.equal(first, pipe(3, seed=7, batch_size=3, **kwargs))
    assert not torch.allclose(first, pipe(3, seed=8, batch_size=3, **kwargs), atol=1e-3)
    # Per-image generators: the batching changes nothing but floating point.
    torch.testing.assert_close(first, pipe(3, seed=7, batch_size=1, **kwargs), atol=1e-5, rtol=0)
    torch.testing.assert_close(first, pipe(3, seed=7, batch_size=2, **kwargs), atol=1e-5, rtol=0)
    # start= continues the numbering, so a run splits into parts.
    torch.testing.assert_close(first[2:], pipe(1, seed=7, start=2, **kwargs), atol=1e-5, rtol=0)
    assert image_seed(0, 1) != image_seed(1, 0) and image_seed(3, 4) == image_seed(3, 4)


def test_ddim_eta0_is_deterministic_ddim_from_the_seeded_x_T(pipe) -> None:
    out = pipe(2, seed=3, steps=5, eta=0.0, progress=False, return_latents=True)
    generators = [torch.Generator().manual_seed(image_seed(3, i)) for i in range(2)]
    x_T = torch.cat([torch.randn((1, 3, 8, 8), generator=g) for g in generators])
    timesteps = NoiseSchedule.ldm().ddim_timesteps(5)
    alphas_cumprod = ldm_buffers(NoiseSchedule.ldm())["alphas_cumprod"]
    expected = ddim(lambda x, t: pipe.ldm.eps(x, t), x_T, alphas_cumprod, timesteps, 0.0)
    assert torch.equal(out.latents, expected)
    assert not torch.equal(
        out.latents, pipe(2, seed=3, steps=5, eta=1.0, progress=False, return_latents=True)[1]
    )


def test_step_count_official_rule_and_exact_steps(pipe) -> None:
    pipe(1, steps=150, progress=False)
    assert pipe.last_run["network_calls"] == 167 == math.ceil(1000 / (1000 // 150))
    pipe(1, steps=150, exact_steps=True, progress=False)
    assert pipe.last_run["network_calls"] == 150 and pipe.last_run["exact_steps"] is True
    pipe(1, steps=7, progress=False)
    assert pipe.last_run["network_calls"] == len(range(0, 1000, 1000 // 7)) == 8
    # The official rule would feed step 999 + 1 for 3 steps (c = 333); exact steps can.
    with pytest.raises(ValueError, match="exact_steps=True"):
        pipe(1, steps=3)
    pipe(1, steps=3, exact_steps=True, progress=False)
    assert pipe.last_run["network_calls"] == 3


def test_ddpm_and_dpm_samplers(pipe) -> None:
    images = pipe(1, sampler="ddpm", progress=False)
    assert pipe.last_run["network_calls"] == 1000 and pipe.last_run["eta"] is None
    assert images.shape == (1, 1, SIZE, SIZE) and torch.isfinite(images).all()
    first = pipe(2, sampler="dpm", steps=7, progress=False)
    assert pipe.last_run["sampler"] == "dpmpp_2m"
    calls = len(solver_timesteps(NoiseSchedule.ldm().alphas_cumprod, 7))
    assert pipe.last_run["network_calls"] == calls
    assert torch.equal(first, pipe(2, sampler="dpmpp_2m", steps=7, progress=False))
    with pytest.raises(ValueError, match="ddpm runs all 1000 steps"):
        pipe(1, sampler="ddpm", steps=100)
    with pytest.raises(ValueError, match="sampler 'euler'"):
        pipe(1, sampler="euler")


def test_bf16_autocast_keeps_fp32_results() -> None:
    pipe = Pipeline(tiny_ldm(), image_size=SIZE, device="cpu", dtype=torch.bfloat16)
    out = pipe(2, steps=4, progress=False, return_latents=True)
    assert pipe.last_run["dtype"] == "bfloat16"
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    with pytest.raises(ValueError, match="bfloat16"):
        Pipeline(tiny_ldm(), image_size=SIZE, device="cpu", dtype=torch.float16)


def test_construction_errors(tmp_path) -> None:
    from cheff.checkpoints import CheckpointError

    sdm = save_ldm(tiny_ldm(), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="sr.pt: no such checkpoint file"):
        Pipeline.from_checkpoints(sdm, sr=tmp_path / "sr.pt")
    with pytest.raises(CheckpointError, match="holds a 'ldm', not an SR model"):
        Pipeline.from_checkpoints(sdm, sr=sdm)
    model = tiny_ldm()
    with pytest.raises(ValueError, match="multiple of 2"):
        Pipeline(model, image_size=15, device="cpu")
    with pytest.raises(ValueError, match="no autoencoder"):
        Pipeline(LatentDiffusion(model.unet), device="cpu")


def test_from_checkpoints_reads_a_saved_ldm(tmp_path, pipe) -> None:
    path = save_ldm(tiny_ldm(), tmp_path / "tiny.safetensors")
    loaded = Pipeline.from_checkpoints(path, device="cpu", image_size=SIZE)
    kwargs = {"seed": 2, "steps": 4, "progress": False}
    assert torch.equal(loaded(2, **kwargs), pipe(2, **kwargs))


# ----------------------------------------------------------------------------- in-painting


def _image_and_mask(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    image = torch.rand(batch, 1, SIZE, SIZE)
    mask = torch.ones(1, 1, SIZE, SIZE)
    mask[..., 4:12, 4:12] = 0  # generate the centre
    return image, mask


def test_inpaint_paste_back_keeps_the_known_latent_exactly(pipe) -> None:
    image, mask = _image_and_mask()
    out = pipe.inpaint(image, mask, steps=5, progress=False, return_latents=True)
    known = pipe.ldm.encode_images(image.expand(-1, 3, -1, -1) * 2 - 1, scaled=False)
    keep = latent_mask(mask, (8, 8)).expand_as(known).bool()
    assert torch.equal(out.latents[keep], known[keep])
    assert not torch.allclose(out.latents[~keep], known[~keep], atol=1e-2)
    assert out.images.shape == (2, 1, SIZE, SIZE)
    assert pipe.last_run["task"] == "inpaint" and pipe.last_run["network_calls"] == 5
    assert pipe.last_run["kept_fraction"] == 0.75
    # The official output (no paste-back) is only near the known latent in the kept region.
    official = pipe.inpaint(
        image, mask, steps=5, paste_back=False, progress=False, return_latents=True
    )
    assert not torch.equal(official.latents[keep], known[keep])
    assert torch.equal(official.latents[~keep], out.latents[~keep])
    # Everything kept: the decoded image is the decoded known latent.
    whole = pipe.inpaint(image, torch.ones(SIZE, SIZE), steps=4, progress=False)
    torch.testing.assert_close(whole, to_grey(pipe.ldm.decode_latents(known)), atol=1e-6, rtol=0)


def test_paste_back_keeps_the_input_on_a_model_with_a_scale_factor() -> None:
    """On the report model (scale factor 0.18215) the pasted latent was the official unscaled
    one, which the decoder divides by the factor: the kept region came out 5.5x off."""
    ldm = tiny_ldm()
    ldm.scale_factor = 0.18215
    scaled = Pipeline(ldm, image_size=SIZE, device="cpu")
    image, _ = _image_and_mask(1)
    with torch.no_grad():
        reconstruction = to_grey(ldm.autoencoder.reconstruct(image.expand(-1, 3, -1, -1) * 2 - 1))
    for scaled_known in (False, True):
        whole = scaled.inpaint(
            image, torch.ones(SIZE, SIZE), steps=2, progress=False, scaled_known=scaled_known
        )
        torch.testing.assert_close(whole, reconstruction, atol=1e-5, rtol=0)


def test_eta_and_the_cascades_options_are_checked_before_sampling(pipe, monkeypatch) -> None:
    """eta=nan gave NaN latents written as black PNGs; a negative eta dropped the noise term;
    a bad sr_steps failed only after the LDM stage's first batch."""
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig
    from cheff.upscale import Upscaler

    image, mask = _image_and_mask(1)
    for eta in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            pipe(1, steps=2, eta=eta, progress=False)
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            pipe.inpaint(image, mask, steps=2, eta=eta, progress=False)
    sr = SuperResolution(SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 2), attention_layers=1)))
    cascade = Pipeline(pipe.ldm, image_size=SIZE, device="cpu")
    cascade.upscaler = Upscaler(sr, size=32, device="cpu")
    calls = []
    monkeypatch.setattr(pipe.ldm, "eps", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="steps"):
        cascade(1, steps=2, sr_steps=0, progress=False)
    with pytest.raises(ValueError, match="sr_eta must be a finite number >= 0"):
        cascade.inpaint(image, mask, steps=2, sr_eta=math.nan, progress=False)
    assert calls == []  # refused before the LDM stage ran
    with pytest.raises(ValueError, match="sr_eta must be"):
        cascade.upscaler(torch.rand(1, 1, SIZE, SIZE), steps=2, eta=-0.5, progress=False)


def test_one_label_vector_may_begin_with_a_missing_value() -> None:
    from cheff.pipeline import _per_image

    vector = [None, *[1.0] * 13]
    assert _per_image(vector, 4, "labels") == [vector] * 4
    assert _per_image([math.nan, *[0.0] * 13], 2, "labels") == [[math.nan, *[0.0] * 13]] * 2


def test_inpaint_is_seeded_per_image(pipe) -> None:
    image, mask = _image_and_mask(3)
    kwargs = {"seed": 4, "steps": 4, "progress": False}
    first = pipe.inpaint(image, mask, batch_size=3, **kwargs)
    torch.testing.assert_close(
        first, pipe.inpaint(image, mask, batch_size=2, **kwargs), atol=1e-5, rtol=0
    )
    assert not torch.equal(
        first, pipe.inpaint(image, mask, batch_size=3, seed=5, steps=4, progress=False)
    )


def test_latent_mask_rule() -> None:
    mask = torch.ones(1, 1, 16, 16)
    mask[0, 0, 0, 0] = 0  # one pixel to generate: its whole 2x2 cell is generated
    mask[0, 0, 4, 4] = 0.6  # >= 0.5 counts as keep
    mask[0, 0, 8, 8] = 0.4
    cells = latent_mask(mask, (8, 8))
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0, 0, 0] = expected[0, 0, 4, 4] = 0
    assert torch.equal(cells, expected)
    given = torch.rand(2, 1, 8, 8)
    assert torch.equal(latent_mask(given, (8, 8)), given)  # already on the latent grid
    with pytest.raises(ValueError, match="integer multiple"):
        latent_mask(torch.ones(1, 1, 12, 12), (8, 8))
    # Used as it is, a 0/255 mask on the latent grid blended 255 times the known latent in.
    for bad in (given * 255, given - 0.5, torch.full((1, 1, 8, 8), math.nan)):
        with pytest.raises(ValueError, match=r"latent resolution 8x8: values in \[0, 1\]"):
            latent_mask(bad, (8, 8))


def test_parity_ldm_uncond_inpaint_latents_and_pipeline() -> None:
    folder = fixture("ldm_uncond")
    cfg, data = config(folder), io(folder)
    unet_config = UNetConfig.from_official(cfg["unet"])  # 16-channel heads: not in the weights
    model = load_ldm(checkpoint(folder), config=unet_config)
    schedule = NoiseSchedule.ldm(
        cfg["schedule"]["timesteps"], cfg["schedule"]["linear_start"], cfg["schedule"]["linear_end"]
    )
    timesteps = schedule.ddim_timesteps(cfg["ddim_steps"])
    alphas_cumprod = ldm_buffers(schedule)["alphas_cumprod"]
    mask = data["inpaint_mask"]
    with torch.no_grad():
        known = model.encode_images(data["inpaint_target_img"], scaled=False)
        args = (Counting(model), known, mask, data["inpaint_x_T"], timesteps, alphas_cumprod, 1.0)
        noises = {
            "noises": list(data["inpaint_ddim_noises"]),
            "q_noises": list(data["inpaint_q_sample_noises"]),
        }
        official = inpaint_latents(*args, **noises)
        pasted = inpaint_latents(*args, **noises, paste_back=True)
    assert_close(official, data["inpaint_samples"], MULTI_STEP, "samples")
    keep = mask.expand_as(known).bool()
    assert torch.equal(pasted[keep], known[keep])
    assert torch.equal(pasted[~keep], official[~keep])

    pipe = Pipeline.from_checkpoints(
        checkpoint(folder), device="cpu", unet_config=unet_config, image_size=16
    )
    images = pipe(2, steps=cfg["ddim_steps"], progress=False)
    assert images.shape == (2, 1, 16, 16) and pipe.last_run["network_calls"] == 5
    image01 = (data["inpaint_target_img"] + 1) / 2
    out = pipe.inpaint(image01, mask, steps=cfg["ddim_steps"], progress=False, return_latents=True)
    torch.testing.assert_close(out.latents[keep], known[keep], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- files


def test_png_round_trip_and_grid(tmp_path) -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE)
    paths = save_images(images, tmp_path / "out", start=4)
    assert [p.name for p in paths] == ["sample_00004.png", "sample_00005.png", "sample_00006.png"]
    with Image.open(paths[0]) as png:
        assert png.mode == "L" and png.size == (SIZE, SIZE)
    back = torch.cat([load_image(p, size=SIZE) for p in paths])
    assert back.shape == (3, 1, SIZE, SIZE)
    assert (back - images).abs().max() <= 0.5 / 255 + 1e-6
    grid = save_grid(images, tmp_path / "grid.png")
    with Image.open(grid) as png:  # 2 per row, 2 px padding
        assert png.size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    # 16-bit and RGB inputs, non-square centre crop, resize.
    wide = np.zeros((16, 24), np.uint16)
    wide[:, 4:20] = 30000
    wide[0, 0] = 65535  # full range (as machex writes png16), outside the centre crop
    Image.fromarray(wide).save(tmp_path / "wide16.png")
    assert torch.allclose(
        load_image(tmp_path / "wide16.png", size=None), torch.tensor(30000 / 65535)
    )
    assert load_image(tmp_path / "wide16.png", size=8).shape == (1, 1, 8, 8)
    # A 12-bit radiograph in a 16-bit PNG (PadChest's): machex's raw rule, not 16x too dark.
    twelve = np.full((16, 16), 1000, np.uint16)
    twelve[0, 0] = 4095
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    read = load_image(tmp_path / "twelve.png", size=None)
    assert read.max() == 1 and torch.isclose(read[0, 0, 5, 5], torch.tensor(1000 / 4095))
    from cheff.eval.fid import read_grey

    assert torch.equal(read_grey(tmp_path / "twelve.png"), read)  # FID reads it alike
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    assert torch.allclose(load_image(tmp_path / "red.png"), torch.tensor(76 / 255))


def test_mask_png_white_is_keep(tmp_path) -> None:
    array = np.full((32, 32), 255, np.uint8)
    array[8:24, 8:24] = 0
    Image.fromarray(array).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", size=16)
    assert mask.shape == (1, 1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, 8, 8] == 0 and mask.mean() == 0.75
    assert torch.equal(load_mask(tmp_path / "mask.png", size=16, invert=True), 1 - mask)


# ----------------------------------------------------------------------------- the CLI


def test_cli_sample_and_inpaint_write_pngs_and_settings(tmp_path) -> None:
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from cheff.checkpoints import save_ldm
    from cli.cheff_cli import app

    checkpoint = save_ldm(tiny_ldm(), tmp_path / "ldm.safetensors")
    runner = CliRunner()
    out = tmp_path / "samples"
    common = ["--steps", "3", "--exact-steps", "-q", "--device", "cpu", "--image-size", "64"]
    result = runner.invoke(
        app, ["sample", "--sdm", str(checkpoint), "--n", "2", "--out", str(out), *common]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "sample.json").read_text())
    assert info["network_calls"] == 3 and info["n"] == 2 and info["sdm"] == str(checkpoint)
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 2 and (out / "grid.png").is_file()
    with Image.open(pngs[0]) as png:
        assert png.size == (64, 64) and png.mode == "L"

    Image.fromarray((np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)).save(
        tmp_path / "x.png"
    )
    keep = np.full((64, 64), 255, np.uint8)
    keep[16:32, 16:32] = 0  # regenerate this square
    Image.fromarray(keep).save(tmp_path / "m.png")
    args = ["inpaint", "--sdm", str(checkpoint), "--image", str(tmp_path / "x.png")]
    args += ["--mask", str(tmp_path / "m.png"), "--n", "1", "--out", str(tmp_path / "ip")]
    result = runner.invoke(app, [*args, *common])
    assert result.exit_code == 0, result.output
    (filled,) = (tmp_path / "ip").glob("inpaint_*.png")
    text = read_provenance(filled)  # what was in-painted, under which mask
    assert text["cheff:source_image"] == str(tmp_path / "x.png")
    assert text["cheff:mask"] == str(tmp_path / "m.png") and text["cheff:synthetic"] == "true"
    record = json.loads((tmp_path / "ip" / "inpaint.json").read_text())
    assert record["paste_back"] is True and record["scaled_known"] is False
    args = [*args[:-1], str(tmp_path / "ip2"), "--scaled-known"]
    result = runner.invoke(app, [*args, *common])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ip2" / "inpaint.json").read_text())["scaled_known"] is True
    result = runner.invoke(app, [*args[:-2], str(tmp_path / "ip3"), "--ema", *common])
    assert result.exit_code == 2 and "drop --ema" in result.output  # a file without EMA weights
    missing = ["sample", "--sdm", str(tmp_path / "no.pt"), "--out", str(tmp_path / "new")]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "no such checkpoint" in result.output


def test_on_batch_streams_the_same_images_and_keeps_none(pipe) -> None:
    whole = pipe(5, seed=3, steps=3, exact_steps=True, batch_size=2, progress=False)
    got: list[tuple[int, torch.Tensor]] = []
    result = pipe(
        5,
        seed=3,
        steps=3,
        exact_steps=True,
        batch_size=2,
        progress=False,
        on_batch=lambda offset, samples: got.append((offset, samples.images)),
    )
    assert result is None and [offset for offset, _ in got] == [0, 2, 4]
    assert torch.equal(torch.cat([images for _, images in got]), whole)
    assert pipe.last_run["n"] == 5 and pipe.last_run["network_calls"] == 3
    assert len(pipe.image_text(range(2, 4))) == 2
    assert pipe.image_text(range(2, 4))[0]["cheff:index"] == "2"


def test_cli_sample_interrupted_keeps_finished_images_and_says_how_to_finish(
    tmp_path, monkeypatch
) -> None:
    """A killed run leaves its finished batches on disk; the printed --start/--n finish it,
    and together they equal an uninterrupted run, byte for byte."""
    from typer.testing import CliRunner

    from cheff.checkpoints import save_ldm
    from cli import cheff_cli
    from cli.cheff_cli import app

    checkpoint = save_ldm(tiny_ldm(), tmp_path / "ldm.safetensors")
    runner = CliRunner()
    common = ["--sdm", str(checkpoint), "--steps", "3", "--exact-steps", "-q", "--device", "cpu"]
    common += ["--image-size", "32", "-b", "2"]
    result = runner.invoke(app, ["sample", *common, "--n", "5", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output

    write = cheff_cli._RunWriter.__call__

    def write_then_stop(self, offset, samples):
        write(self, offset, samples)
        if offset >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cheff_cli._RunWriter, "__call__", write_then_stop)
    out = tmp_path / "b"
    result = runner.invoke(app, ["sample", *common, "--n", "5", "--out", str(out)])
    assert result.exit_code == 130
    assert "4 finished images" in result.output and "--start 4 --n 1" in result.output
    assert len(list(out.glob("sample_*.png"))) == 4 and not (out / "sample.json").exists()
    monkeypatch.undo()
    result = runner.invoke(app, ["sample", *common, "--n", "1", "--start", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "a").glob("sample_*.png"))
    assert names == sorted(p.name for p in out.glob("sample_*.png")) and len(names) == 5
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name

    again = ["sample", *common, "--n", "2", "--seed", "5", "--out", str(out)]
    result = runner.invoke(app, again)  # would replace 2 of the 5 and sample.json
    assert result.exit_code == 2
    assert "already holds sample_00000.png, sample_00001.png from an earlier run" in result.output
    assert (tmp_path / "a" / names[0]).read_bytes() == (out / names[0]).read_bytes()
    result = runner.invoke(app, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / names[0]).read_bytes() != (out / names[0]).read_bytes()


def test_cli_sample_refuses_an_unusable_out_before_sampling(tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"x")
    missing = tmp_path / "no.pt"  # the folder is checked before the checkpoint is read
    result = CliRunner().invoke(
        app, ["sample", "--sdm", str(missing), "--out", str(blocker / "sub"), "-q"]
    )
    assert result.exit_code == 2 and "is a file; expected a folder" in result.output


def test_cli_inpaint_refuses_a_mask_drawn_for_another_shape(tmp_path) -> None:
    from typer.testing import CliRunner

    from cheff.checkpoints import save_ldm
    from cli.cheff_cli import app

    checkpoint = save_ldm(tiny_ldm(), tmp_path / "ldm.safetensors")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((60, 100), 255, np.uint8)).save(tmp_path / "m.png")
    args = ["inpaint", "--sdm", str(checkpoint), "--image", str(tmp_path / "x.png"), "-q"]
    args += ["--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "ip")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "is 100x60 but --image" in result.output


def test_our_ldm_file_serves_as_an_autoencoder_and_other_kinds_say_what_they_hold(
    tmp_path,
) -> None:
    """As the released LDMs do: ``--ae ldm.safetensors`` reads the autoencoder inside."""
    from cheff.checkpoints import CheckpointError, load_autoencoder, save_checkpoint, save_ldm

    model = tiny_ldm()
    path = save_ldm(model, tmp_path / "ldm.safetensors")
    ae = load_autoencoder(path)
    expected = model.autoencoder.state_dict()
    assert ae.state_dict().keys() == expected.keys()
    assert all(torch.equal(ae.state_dict()[k], expected[k]) for k in expected)
    sr_like = save_checkpoint(
        torch.nn.Linear(2, 2), tmp_path / "sr.safetensors", kind="sr", config={}
    )
    with pytest.raises(CheckpointError, match="holds a 'sr' without an autoencoder"):
        load_autoencoder(sr_like)


def test_sampling_defaults_to_the_side_the_file_was_trained_at(tmp_path) -> None:
    trained = save_ldm(tiny_ldm(), tmp_path / "a.safetensors", image_size="32")
    plain = save_ldm(tiny_ldm(), tmp_path / "b.safetensors")
    assert Pipeline.from_checkpoints(trained, device="cpu").image_size == 32
    assert Pipeline.from_checkpoints(plain, device="cpu").image_size == 256
    assert Pipeline.from_checkpoints(trained, device="cpu", image_size=64).image_size == 64


def test_inpaint_records_the_side_it_ran_at_and_the_prompts_hint_counts_lines(
    pipe, tmp_path
) -> None:
    from cli.cheff_cli import _line_of_prompt

    image, mask = torch.rand(1, 1, 32, 32), torch.ones(1, 1, 32, 32)
    pipe.inpaint(image, mask, steps=2, exact_steps=True, progress=False)
    assert pipe.image_size == SIZE and pipe.last_run["image_size"] == 32
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\n  \nsecond\nthird\n")
    assert [_line_of_prompt(prompts, k) for k in (1, 2, 3)] == [1, 4, 5]


def test_a_prompts_file_is_split_at_line_ends_only(tmp_path) -> None:
    """U+2028 or a form feed inside a pasted report made it several prompts (str.splitlines);
    a byte-order mark stayed in the first; a Latin-1 file failed without naming it."""
    from cli.cheff_cli import _condition_args, _line_of_prompt

    prompts = tmp_path / "prompts.txt"
    text = "\ufeffLarge right effusion.\u2028No pneumothorax.\r\n\r\nCardiomegaly.\fStable.\n"
    prompts.write_bytes(text.encode("utf-8"))
    assert _condition_args(None, prompts, None)["prompt"] == [
        "Large right effusion.\u2028No pneumothorax.",
        "Cardiomegaly.\fStable.",
    ]
    assert [_line_of_prompt(prompts, k) for k in (1, 2)] == [1, 3]
    prompts.write_bytes("Épanchement.\n".encode("latin-1"))
    with pytest.raises(ValueError, match="prompts.txt: not UTF-8 text"):
        _condition_args(None, prompts, None)


def test_cli_convert_takes_the_head_split_an_official_file_does_not_store(tmp_path) -> None:
    """The ldm_uncond fixture has 16-channel heads: converted with the default 32 the U-Net
    computes something else; with --num-head-channels 16 it is the official one."""
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    folder = fixture("ldm_uncond")
    reference = load_ldm(
        checkpoint(folder), config=UNetConfig.from_official(config(folder)["unet"])
    )
    runner = CliRunner()
    outputs = {}
    for heads in ("32", "16"):
        target = tmp_path / f"ldm{heads}.safetensors"
        args = ["convert", "--kind", "ldm", str(checkpoint(folder)), str(target)]
        result = runner.invoke(app, [*args, "--num-head-channels", heads])
        assert result.exit_code == 0, result.output
        converted = load_ldm(target)
        assert converted.unet.config.num_head_channels == int(heads)
        outputs[heads] = converted
    side = reference.unet.config.in_channels
    x = torch.randn(1, side, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        want = reference.unet(x, t)
        assert torch.equal(outputs["16"].unet(x, t), want)
        assert not torch.allclose(outputs["32"].unet(x, t), want, atol=1e-3)
    args = ["convert", str(checkpoint(folder)), "x", "--num-heads", "4", "--kind", "autoencoder"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "for --kind ldm" in result.output
    whole = tmp_path / "auto.safetensors"
    auto = runner.invoke(app, ["convert", str(checkpoint(folder)), str(whole)])
    assert auto.exit_code == 0, auto.output
    assert "converting its ldm (--kind auto)" in auto.output
    assert isinstance(load_ldm(whole), type(reference))  # the whole LDM


# ----------------------------------------------------------------------------- input checks


def test_inpaint_takes_only_float_images_in_0_1(pipe) -> None:
    """A uint8 or 0-255 image used to run (x * 2 - 1 up to 509) and give garbage."""
    image = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1, SIZE, SIZE)
    run = {"steps": 2, "exact_steps": True, "progress": False}
    with pytest.raises(ValueError, match=r"image: .*\[0, 1\], got dtype uint8"):
        pipe.inpaint((image * 255).to(torch.uint8), mask, **run)
    with pytest.raises(ValueError, match=r"image: values must lie in \[0, 1\].*divide by 255"):
        pipe.inpaint(image * 255, mask, **run)
    with pytest.raises(ValueError, match=r"image: values must lie in \[0, 1\], got \[-"):
        pipe.inpaint(image * 2 - 1, mask, **run)
    nudged = image.clone()
    nudged[0, 0, 0, 0] = 1.0005  # resampling overshoot is let through as it is
    assert pipe.inpaint(nudged, mask, **run).shape == (1, 1, SIZE, SIZE)


def test_seed_must_be_an_int(pipe) -> None:
    """``seed=torch.Generator()`` failed inside int() without naming seed."""
    with pytest.raises(TypeError, match="seed: an int, not Generator"):
        pipe(1, steps=2, progress=False, seed=torch.Generator())
    image, mask = torch.rand(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    with pytest.raises(TypeError, match="seed: an int, not float"):
        pipe.inpaint(image, mask, steps=2, progress=False, seed=1.5)
    with pytest.raises(TypeError, match="seed: an int, not a bool"):
        pipe(1, steps=2, progress=False, seed=True)
    by_numpy = pipe(1, steps=2, progress=False, seed=np.int64(4))
    assert torch.equal(by_numpy, pipe(1, steps=2, progress=False, seed=4))


def test_a_prompt_that_is_not_text_is_a_condition_error() -> None:
    """``pipe(prompt=1)`` on a report model said "'int' object is not iterable"."""
    pytest.importorskip("tokenizers")
    from cheff.conditioning import Conditioner, ConditionError
    from cheff.models.text_encoder import TextEncoder, TextEncoderConfig
    from cheff.text import ReportTokenizer

    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "effusion"])
    torch.manual_seed(0)
    unet = UNetModel(
        UNetConfig(
            model_channels=32,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_levels=(0,),
            num_head_channels=32,
            context_dim=16,
        )
    )
    encoder = TextEncoder(
        TextEncoderConfig(
            vocab_size=7, max_seq_len=8, n_embed=16, n_layer=1, heads=2, head_dim=8, ff_mult=2
        )
    )
    ae = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1))
    ldm = LatentDiffusion(
        unet, ae, conditioning_key="crossattn", text_encoder=encoder, condition="report"
    ).eval()
    conditioner = Conditioner("report", ReportTokenizer.from_vocab_text(vocab, 8))
    report = Pipeline(ldm, image_size=SIZE, device="cpu", conditioner=conditioner)
    with pytest.raises(ConditionError, match="prompt: one value for all images .* not int"):
        report(2, prompt=1, steps=2, progress=False)
    assert report(2, prompt="no effusion", steps=2, progress=False).shape == (2, 1, SIZE, SIZE)


# ----------------------------------------------------------------------------- head split


@pytest.mark.parametrize(
    "name, option, default", [("ldm_uncond", "num_head_channels", 32), ("ldm_t2i", "num_heads", 8)]
)
def test_parity_from_checkpoints_takes_the_head_split_of_an_official_file(
    name, option, default, tmp_path
) -> None:
    """An official file does not store its head split; the fixtures' (16-channel heads, 4
    heads) differ from the released models' the loader assumes. With the option the pipeline's
    model gives the official outputs; without it other ones, without an error."""
    folder = fixture(name)
    cfg, data = config(folder), io(folder)
    extra = {}
    if cfg["cond_stage"] is not None:
        pytest.importorskip("tokenizers")
        extra["vocab"] = tmp_path / "vocab.txt"  # the model's tokenizer; unused here
        extra["vocab"].write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nno\n")
    heads = cfg["unet"][option]

    def outputs(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
        context = None if "token_ids" not in data else pipe.ldm.context(data["token_ids"])
        timesteps = pipe.schedule.ddim_timesteps(cfg["ddim_steps"])
        with torch.no_grad():
            eps = pipe.ldm.eps(data["x_t"], data["t"], context)
            samples = ddim(
                lambda x, t: pipe.ldm.eps(x, t, context),
                data["ddim_x_T"],
                pipe.alphas_cumprod,
                timesteps,
                0.0,
            )
        return eps, samples

    pipe = Pipeline.from_checkpoints(checkpoint(folder), device="cpu", **{option: heads}, **extra)
    eps, samples = outputs(pipe)
    assert_close(eps, data["eps"], SINGLE, "eps")
    assert_close(samples, data["ddim_eta0_samples"], MULTI_STEP, "ddim eta 0 samples")
    if heads != default:
        assumed = Pipeline.from_checkpoints(checkpoint(folder), device="cpu", **extra)
        eps, _ = outputs(assumed)
        assert (eps - data["eps"]).abs().max() > 100 * SINGLE * max(1, data["eps"].abs().max())
    with pytest.raises(CheckpointError, match="our files store their head split"):
        Pipeline.from_checkpoints(
            save_ldm(tiny_ldm(), tmp_path / "ours.safetensors"), num_head_channels=16
        )


def test_parity_cli_sample_and_inpaint_take_the_head_split(tmp_path) -> None:
    """``cheff sample`` / ``cheff inpaint --num-head-channels`` reach the loader: their PNGs
    are the pipeline's with the fixture's head split, not those with the assumed 32."""
    from typer.testing import CliRunner

    from cheff.pipeline import _to_uint8
    from cli.cheff_cli import app

    folder = fixture("ldm_uncond")
    heads = config(folder)["unet"]["num_head_channels"]
    sdm = str(checkpoint(folder))
    runner = CliRunner()
    common = ["--steps", "3", "--exact-steps", "-q", "--device", "cpu", "--image-size", "16"]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), np.uint8)).save(
        tmp_path / "x.png"
    )
    keep = np.full((16, 16), 255, np.uint8)
    keep[4:12, 4:12] = 0
    Image.fromarray(keep).save(tmp_path / "m.png")
    files = ["--image", str(tmp_path / "x.png"), "--mask", str(tmp_path / "m.png")]
    for command, extra in (("sample", ["--n", "1"]), ("inpaint", [*files, "--n", "1"])):
        out = tmp_path / command
        args = [command, "--sdm", sdm, "--out", str(out), *common, *extra]
        result = runner.invoke(app, [*args, "--num-head-channels", str(heads)])
        assert result.exit_code == 0, result.output
        with Image.open(out / f"{command}_00000.png") as png:
            written = np.asarray(png)
        wanted, assumed = (
            Pipeline.from_checkpoints(sdm, device="cpu", image_size=16, num_head_channels=h)
            for h in (heads, None)
        )
        run = {"steps": 3, "exact_steps": True, "progress": False}
        if command == "sample":
            images = [p(1, **run) for p in (wanted, assumed)]
        else:
            picture, mask = load_image(tmp_path / "x.png", 16), load_mask(tmp_path / "m.png", 16)
            images = [p.inpaint(picture, mask, **run) for p in (wanted, assumed)]
        assert np.array_equal(written, _to_uint8(images[0][0])), command
        if heads != 32:
            assert not np.array_equal(written, _to_uint8(images[1][0])), command
    ours = save_ldm(tiny_ldm(), tmp_path / "ours.safetensors")
    args = ["sample", "--sdm", str(ours), "--out", str(tmp_path / "o"), "--num-heads", "4"]
    result = runner.invoke(app, [*args, *common])
    assert result.exit_code == 2 and "store their head split" in result.output
