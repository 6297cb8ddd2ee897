"""The KL autoencoder: parity with the official code, the released layout, the model API."""

from __future__ import annotations

import json

import pytest
import torch
from cheff_parity import (
    assert_close,
    checkpoint,
    config,
    fixture,
    io,
    parity_dir,
)

from cheff import PRESETS, AutoencoderConfig, AutoencoderKL, load_autoencoder
from cheff.checkpoints import autoencoder_config_from_state, convert, read_checkpoint
from cheff.models.autoencoder import DiagonalGaussian

# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def ae_fixture():
    folder = fixture("ae")
    return folder, config(folder), io(folder)


def test_parity_ae_config_is_read_off_the_weights(ae_fixture) -> None:
    folder, cfg, _ = ae_fixture
    model = load_autoencoder(checkpoint(folder))
    assert model.config == AutoencoderConfig.from_official(cfg["ddconfig"], cfg["embed_dim"])
    assert sum(p.numel() for p in model.parameters()) == cfg["num_parameters"]
    assert not model.training


def test_parity_ae_loader_ignores_the_training_loss_keys(ae_fixture) -> None:
    folder, cfg, _ = ae_fixture
    state = read_checkpoint(checkpoint(folder)).state_dict
    extras = cfg["container"]["ignored_extra_keys"]
    assert extras and all(key in state for key in extras)
    loaded = load_autoencoder(checkpoint(folder)).state_dict()
    assert not set(extras) & set(loaded)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_parity_ae_posterior(ae_fixture) -> None:
    folder, _, data = ae_fixture
    model = load_autoencoder(checkpoint(folder))
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(data["x"]))
        posterior = model.encode(data["x"])
    assert_close(moments, data["moments"], what="moments")
    assert_close(posterior.mean, data["posterior_mean"], what="mean")
    assert_close(posterior.logvar, data["posterior_logvar"], what="logvar")
    assert_close(posterior.std, data["posterior_std"], what="std")


def test_parity_ae_decode(ae_fixture) -> None:
    folder, _, data = ae_fixture
    model = load_autoencoder(checkpoint(folder))
    with torch.no_grad():
        assert_close(model.reconstruct(data["x"]), data["decode_of_mean"], what="decode(mean)")
        assert_close(model.decode(data["z_in"]), data["decode_of_z_in"], what="decode(z_in)")


def test_parity_ae_through_our_format_is_bitwise_the_same(ae_fixture, tmp_path) -> None:
    folder, _, data = ae_fixture
    ours = convert(checkpoint(folder), tmp_path / "ae.safetensors")
    official, converted = load_autoencoder(checkpoint(folder)), load_autoencoder(ours)
    assert converted.config == official.config
    with torch.no_grad():
        assert torch.equal(converted.reconstruct(data["x"]), official.reconstruct(data["x"]))


@pytest.mark.parametrize("name", ["ldm_uncond", "ldm_t2i"])
def test_parity_ae_inside_the_ldm_files(name: str) -> None:
    """The released LDMs carry their autoencoder as ``first_stage_model.*``."""
    folder = fixture(name)
    cfg, data = config(folder), io(folder)
    model = load_autoencoder(checkpoint(folder))
    embed_dim = cfg["unet"]["in_channels"]
    assert model.config == AutoencoderConfig.from_official(cfg["first_stage"], embed_dim)
    with torch.no_grad():
        decoded = model.decode(data["ddim_eta0_samples"] / cfg["scale_factor"])
    assert_close(decoded, data["ddim_eta0_decoded"], what=f"{name} decode")


def test_parity_ae_released_layout_is_ours() -> None:
    """Every key, shape and the order of the released ``cheff_autoencoder.pt``."""
    layout_file = parity_dir().parent / "layouts" / "cheff_autoencoder.json"
    if not layout_file.is_file():
        pytest.skip(f"needs {layout_file} (not present here)")
    layout = json.loads(layout_file.read_text())
    model = AutoencoderKL(PRESETS["paper"].autoencoder)
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert ours == [(key, shape) for key, shape, _ in layout["entries"]]
    counts = layout["parameter_counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["total_parameters"]
    for group in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        assert sum(p.numel() for p in getattr(model, group).parameters()) == counts[group]
    shapes = {key: torch.empty(shape) for key, shape, _ in layout["entries"]}
    assert autoencoder_config_from_state(shapes) == PRESETS["paper"].autoencoder


# --------------------------------------------------------------------------- the model


def test_paper_autoencoder_downsamples_by_four_to_three_channels() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["paper"].autoencoder).eval()
    x = torch.rand(1, 3, 32, 48) * 2 - 1  # small input: same code path as 256 x 256
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (1, 3, 8, 12)
        assert model.decode(posterior.mean).shape == x.shape


def test_encoder_downsampling_pads_right_and_bottom_only() -> None:
    """The official quirk: a change in the top-left pixel reaches the top-left latent."""
    from cheff.models.autoencoder import Downsample

    down = Downsample(32)
    x = torch.zeros(1, 32, 8, 8)
    assert down(x).shape == (1, 32, 4, 4)
    torch.nn.init.ones_(down.conv.weight)
    torch.nn.init.zeros_(down.conv.bias)
    x[..., -1, -1] = 1.0  # bottom-right pixel: seen only thanks to the right/bottom padding
    out = down(x)
    assert out[0, 0, -1, -1] == 32 and out[0, 0, :-1, :].abs().sum() == 0


def test_posterior_statistics_and_sampling() -> None:
    moments = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 50.0)], dim=1)
    posterior = DiagonalGaussian.from_moments(moments)
    assert torch.all(posterior.logvar == 20.0)  # clamped to [-30, 20]
    standard = DiagonalGaussian(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    assert torch.equal(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    assert shifted.kl().item() == pytest.approx(0.5 * 48)
    a = standard.sample(torch.Generator().manual_seed(3))
    b = standard.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, standard.mean)


def test_autoencoder_follows_to_dtype_and_rejects_bad_sizes() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["tiny"].autoencoder).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reference = model.reconstruct(x)
        half = model.to(torch.bfloat16).reconstruct(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 14, 16, dtype=torch.bfloat16))


def test_config_rejects_impossible_architectures() -> None:
    with pytest.raises(ValueError, match="GroupNorm"):
        AutoencoderConfig(base_channels=48)
    with pytest.raises(ValueError, match="attention_levels"):
        AutoencoderConfig(attention_levels=(3,))
    with pytest.raises(ValueError, match="unknown autoencoder config keys"):
        AutoencoderConfig.from_dict({"ch": 128})


def test_encode_checks_channels_and_dtype_and_casts_floats_to_the_weights() -> None:
    """The shape message spoke of channels the check never looked at: 1-channel input met a
    raw conv error, float64 and uint8 "Input type (double) and bias type (float)"."""
    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["tiny"].autoencoder).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got \(2, 1, 16, 16\).*expand"):
        model.encode(x[:, :1])
    with pytest.raises(ValueError, match="floating point images in .* got dtype uint8"):
        model.encode(((x + 1) * 127.5).to(torch.uint8))
    with torch.no_grad():
        single = model.encode(x)
        double = model.encode(x.double())  # numpy's default dtype: cast to the weights'
        assert double.mean.dtype == torch.float32
        assert torch.equal(double.mean, single.mean)
        assert torch.equal(model.decode(single.mean.double()), model.decode(single.mean))
    with pytest.raises(ValueError, match=r"latents \(B, 3, h, w\), got \(2, 6, 4, 4\)"):
        model.decode(torch.zeros(2, 6, 4, 4))


def test_sampled_reconstructions_can_be_seeded() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["tiny"].autoencoder).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        first = model.reconstruct(x, sample=True, generator=torch.Generator().manual_seed(5))
        again = model.reconstruct(x, sample=True, generator=torch.Generator().manual_seed(5))
        other = model.reconstruct(x, sample=True, generator=torch.Generator().manual_seed(6))
        posterior = model.encode(x)
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
        by_hand = model.decode(posterior.mean + posterior.std * noise)
    assert torch.equal(first, again) and torch.equal(first, by_hand)
    assert not torch.allclose(first, other)
