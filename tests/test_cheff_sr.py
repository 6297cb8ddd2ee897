"""The super-resolution model: parity with the official code on ``parity/sr``, the layout of
the released ``cheff_sr_base.pt`` / ``cheff_sr_fine.pt``, our format, and the cascade glue."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cheff_parity import MULTI_STEP, SINGLE, assert_close, checkpoint, config, fixture, io

from cheff.checkpoints import CheckpointError, load_sr, save_sr
from cheff.diffusion import NoiseSchedule, ddim, ddpm, ddpm_step
from cheff.glue import official_glue
from cheff.models.sr import sr_condition
from cheff.models.sr_unet import SRUNet, SRUNetConfig, config_from_state, sr_timestep_embedding

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared" / "cheff-official" / "layouts"
SCHEDULE = NoiseSchedule.sr_cosine()
ALPHAS = SCHEDULE.alphas_cumprod.float()  # the official buffers are float32


@pytest.fixture(scope="module")
def sr():
    folder = fixture("sr")
    return load_sr(checkpoint(folder)), io(folder), config(folder)


def test_parity_sr_condition_and_eps(sr) -> None:
    model, data, cfg = sr
    assert model.unet.config == SRUNetConfig(
        dim=cfg["dim"], dim_mults=tuple(cfg["dim_mults"]), attention_layers=5
    )
    assert sum(p.numel() for p in model.parameters()) == cfg["num_parameters"]
    condition = sr_condition(data["lr_img"], cfg["hr"])
    assert_close(condition, data["sr_cond"], SINGLE, "sr_cond")
    antialiased = data["sr_cond_antialias_variant"]
    assert (condition - antialiased).abs().max() > 1e-3  # the official resize has no antialias
    with torch.no_grad():
        eps = model.eps(data["x_noisy"], data["t"], data["sr_cond"])
    assert_close(eps, data["eps"], SINGLE, "eps")


@pytest.mark.parametrize("steps", [5, 100])
def test_parity_sr_ddim(sr, steps: int) -> None:
    model, data, cfg = sr
    steps = steps if f"ddim{steps}_raw" in data else cfg["ddim_steps"][0]
    timesteps = SCHEDULE.ddim_timesteps(steps)
    assert torch.equal(timesteps, data[f"ddim{steps}_timesteps"])  # no +1 shift, unlike the LDM
    condition = data["sr_cond"]
    with torch.no_grad():
        raw = ddim(
            lambda x, t: model.eps(x, t, condition), data[f"ddim{steps}_x_T"], ALPHAS, timesteps
        )
    assert_close(raw, data[f"ddim{steps}_raw"], MULTI_STEP, f"ddim{steps}_raw")
    assert_close((raw.clamp(-1, 1) + 1) / 2, data[f"ddim{steps}_final01"], MULTI_STEP, "final01")


@pytest.mark.parametrize("t", [1000, 0])
def test_parity_sr_ancestral_step(sr, t: int) -> None:
    model, data, _ = sr
    condition = data["sr_cond"]
    step = ddpm_step(
        lambda x, s: model.eps(x, s, condition),
        data["ddpm_step_x"],
        t,
        SCHEDULE.to(torch.float32),
        noise=data[f"ddpm_step_t{t}_noise"],
    )
    assert_close(step.mean, data[f"ddpm_step_t{t}_mean"], SINGLE, "mean")
    assert_close(step.log_variance, data[f"ddpm_step_t{t}_logvar"], SINGLE, "logvar")
    assert_close(step.sample, data[f"ddpm_step_t{t}_out"], SINGLE, "out")


@pytest.mark.skipif(
    not os.environ.get("CHEFF_SLOW_TESTS"),
    reason="2000 network calls (about a minute on a CPU); set CHEFF_SLOW_TESTS=1 to run",
)
def test_parity_sr_full_ancestral_loop_in_the_official_rng_order(sr) -> None:
    model, data, _ = sr
    condition = data["sr_cond"][:1]
    torch.manual_seed(int(data["ddpm_full_seed"][0]))
    x_T = torch.randn(condition.shape)
    with torch.no_grad():
        raw = ddpm(lambda x, t: model.eps(x, t, condition), x_T, SCHEDULE.to(torch.float32))
    assert_close(raw, data["ddpm_full_raw"], MULTI_STEP, "ddpm_full_raw")


def test_sr_time_embedding_is_sin_then_cos_over_half_minus_one() -> None:
    t = torch.tensor([0, 7, 1999])
    emb = sr_timestep_embedding(t, 16)
    freqs = torch.exp(torch.arange(8) * -(np.log(10000) / 7))
    expected = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], 1)
    torch.testing.assert_close(emb, expected.float())
    assert emb[0, :8].abs().max() == 0 and torch.all(emb[0, 8:] == 1)


@pytest.mark.parametrize("name", ["cheff_sr_base", "cheff_sr_fine"])
def test_released_layout(name: str) -> None:
    path = LAYOUTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    layout = json.loads(path.read_text())
    expected = {key: tuple(shape) for key, shape, _ in layout["entries"]}
    with torch.device("meta"):
        model = SRUNet(SRUNetConfig())
        meta_state = {key: torch.empty(shape) for key, shape in expected.items()}
    state = model.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert list(state) == [key for key, _, _ in layout["entries"]]  # the same order too
    total = sum(value.numel() for value in state.values())
    assert total == layout["parameter_counts"]["total_parameters"] == 91_396_671
    assert config_from_state(meta_state) == SRUNetConfig()
    down_attention = {
        int(k.split(".")[1]) for k in expected if ".2.fn.fn.to_qkv" in k and "downs" in k
    }
    up_attention = {int(k.split(".")[1]) for k in expected if ".2.fn.fn.to_qkv" in k and "ups" in k}
    assert (down_attention, up_attention) == ({4, 5, 6, 7}, {4, 5, 6})


def test_our_format_round_trip_and_clear_errors(sr, tmp_path: Path) -> None:
    model, data, _ = sr
    path = save_sr(model, tmp_path / "sr.safetensors")
    again = load_sr(path)
    assert again.unet.config == model.unet.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    ae_file = fixture("ae")
    with pytest.raises(CheckpointError, match="not a super-resolution model"):
        load_sr(checkpoint(ae_file))


def test_glue_matches_pil_luma_of_the_truncated_8_bit_image() -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    decoded = torch.rand(2, 3, 17, 23, generator=generator) * 2.4 - 1.2  # beyond [-1, 1] too
    decoded[0, :, 0, 0] = torch.tensor([1.0, -1.0, 0.0])
    out = official_glue(decoded)
    assert out.shape == (2, 1, 17, 23)
    for image, result in zip(decoded, out):
        rgb = ((image.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        luma = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.float32) / 255
        np.testing.assert_array_equal(result[0].numpy(), luma)


# --------------------------------------------------------------------------- the Upscaler


@pytest.fixture(scope="module")
def upscaler():
    from cheff.models.sr import SuperResolution
    from cheff.upscale import Upscaler

    torch.manual_seed(0)
    unet = SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1, 2), attention_layers=2))
    return Upscaler(SuperResolution(unet), size=64, device="cpu")


def test_upscaler_takes_only_square_float_images_in_0_1(upscaler) -> None:
    """uint8 and 0-255 images ran and gave other images; a 16x24 one came back 64x64,
    stretched. Now each is refused with what was given and what is expected."""
    low = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    run = {"steps": 1, "progress": False}
    with pytest.raises(ValueError, match="floating point in \\[0, 1\\], got dtype uint8"):
        upscaler((low * 255).to(torch.uint8), **run)
    with pytest.raises(ValueError, match=r"\[0, 1\], got \[.*\] \(8-bit values\? divide by 255"):
        upscaler(low * 255, **run)
    with pytest.raises(ValueError, match=r"got \[-0\.99"):  # [-1, 1] images
        upscaler(low * 2 - 1, **run)
    with pytest.raises(ValueError, match="square, got 16x24.*centre square.*cheff upscale"):
        upscaler(torch.rand(1, 1, 16, 24), **run)
    with pytest.raises(ValueError, match="low-resolution images: .*dtype uint8"):
        sr_condition(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), 64)
    # Resampling overshoot of up to 1e-3 is not an error, and changes nothing else.
    plain = upscaler(low.clamp(0.01, 0.99), **run)
    overshoot = low.clamp(0.01, 0.99)
    overshoot[0, 0, 0, 0], overshoot[1, 0, 0, 0] = 1.0009, -0.0009
    assert upscaler(overshoot, **run).shape == plain.shape == (2, 1, 64, 64)


def test_upscaler_batch_size_and_seed_errors_say_what_was_given(upscaler) -> None:
    low = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch_size >= 1 .* got 0"):
        upscaler(low, steps=1, progress=False, batch_size=0)
    # A generator used to be taken and its repr hashed: a new seed on every run.
    with pytest.raises(TypeError, match="seed: an int, not Generator"):
        upscaler(low, steps=1, progress=False, seed=torch.Generator())
    by_int = upscaler(low[:1], steps=1, progress=False, seed=3)
    by_numpy = upscaler(low[:1], steps=1, progress=False, seed=np.int64(3))
    assert torch.equal(by_int, by_numpy)


def test_upscaler_knows_the_side_its_model_upscales_from(upscaler, tmp_path: Path) -> None:
    """A 512 px image given to the released 256 -> 1024 model was resized by the condition
    without a word, into an input unlike any the model learnt from."""
    from cheff.checkpoints import save_sr
    from cheff.upscale import Upscaler

    released = tmp_path / "sr_base.pt"
    torch.save({"model": upscaler.sr.unet.state_dict(), "epoch": 1, "steps": 2}, released)
    assert Upscaler.from_checkpoint(released, device="cpu").low_size == 256
    assert Upscaler.from_checkpoint(released, size=64, device="cpu").low_size is None
    trained = save_sr(upscaler.sr, tmp_path / "sr.safetensors", image_size="64", low_size="16")
    ours = Upscaler.from_checkpoint(trained, device="cpu")
    assert (ours.size, ours.low_size) == (64, 16)
    low = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ours(low, steps=1, progress=False).shape == (1, 1, 64, 64)
    with pytest.raises(
        ValueError,
        match="32 px images, but this SR model was trained to "
        "upscale 16 px ones: resize them first",
    ):
        ours(torch.rand(1, 1, 32, 32), steps=1, progress=False)
    plain = save_sr(upscaler.sr, tmp_path / "plain.safetensors")  # records no sides
    assert Upscaler.from_checkpoint(plain, device="cpu").low_size is None
