"""The LDM U-Net and ``load_ldm``: parity with the official code, the released layout, the API.

Fixture tests carry ``parity_ldm_uncond`` in their names (``pytest -k parity_ldm_uncond``) and
read every size from the fixture's ``config.json``: another fixture set with other sizes exists.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from cheff_parity import SINGLE, assert_close, checkpoint, config, fixture, io, parity_dir

from cheff import (
    AutoencoderConfig,
    AutoencoderKL,
    CheckpointError,
    LatentDiffusion,
    UNetConfig,
    UNetModel,
    load_autoencoder,
    load_ldm,
    save_ldm,
)
from cheff.checkpoints import ema_key, read_checkpoint, unet_config_from_state
from cheff.models.unet import PAPER, UNCOND_RELEASED, legacy_attention, timestep_embedding

UNET = "model.diffusion_model."

# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def uncond():
    folder = fixture("ldm_uncond")
    cfg = config(folder)
    return folder, cfg, io(folder), UNetConfig.from_official(cfg["unet"])


def official_state(folder) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint(folder), map_location="cpu", weights_only=True)["state_dict"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def test_parity_ldm_uncond_config_is_read_off_the_weights(uncond) -> None:
    folder, cfg, _, expected = uncond
    state = read_checkpoint(checkpoint(folder)).subtree(UNET)
    inferred = unet_config_from_state(state)
    # The head split is the one thing the shapes do not say.
    heads = {"num_head_channels": expected.num_head_channels, "num_heads": expected.num_heads}
    assert dataclasses.replace(inferred, **heads) == expected
    model = load_ldm(checkpoint(folder), config=expected)
    assert isinstance(model, LatentDiffusion) and not model.training
    assert sum(p.numel() for p in model.unet.parameters()) == cfg["num_parameters"]["unet"]
    embed_dim = cfg["unet"]["in_channels"]
    assert model.autoencoder.config == AutoencoderConfig.from_official(
        cfg["first_stage"], embed_dim
    )
    assert model.scale_factor == cfg["scale_factor"]
    assert model.conditioning_key == cfg["conditioning_key"] is None


def test_parity_ldm_uncond_time_embedding(uncond) -> None:
    _, _, data, expected = uncond
    out = timestep_embedding(data["t"], expected.model_channels)
    assert_close(out, data["t_emb"], SINGLE, what="t_emb")


def test_parity_ldm_uncond_eps(uncond) -> None:
    folder, _, data, expected = uncond
    model = load_ldm(checkpoint(folder), config=expected)
    with torch.no_grad():
        eps = model.eps(data["x_t"], data["t"])
    assert_close(eps, data["eps"], SINGLE, what="eps")


def test_parity_ldm_uncond_ema_weights_are_opt_in(uncond) -> None:
    """The fixture's EMA copies differ on purpose: the official samplers use the live weights."""
    folder, cfg, data, expected = uncond
    state = official_state(folder)
    for name in cfg["ema_keys_that_differ_from_live_weights"]:
        assert name in {ema_key(k[len(UNET) :]) for k in state if k.startswith(UNET)}
    manual = UNetModel(expected).eval()
    manual.load_state_dict(
        {
            key: state["model_ema." + ("diffusion_model." + key).replace(".", "")]
            for key in manual.state_dict()
        }
    )
    model = load_ldm(checkpoint(folder), use_ema=True, config=expected)
    with torch.no_grad():
        eps = model.eps(data["x_t"], data["t"])
        assert torch.equal(eps, manual(data["x_t"], data["t"]))
    assert relative_error(eps, data["eps"]) > 100 * SINGLE


def test_parity_ldm_uncond_decode_and_encode(uncond) -> None:
    folder, _, data, expected = uncond
    model = load_ldm(checkpoint(folder), config=expected)
    with torch.no_grad():
        decoded = model.decode_latents(data["ddim_eta0_samples"])
        latent = model.encode_images(data["inpaint_target_img"], scaled=False)
    assert_close(decoded, data["ddim_eta0_decoded"], SINGLE, what="decode")
    assert_close(latent, data["inpaint_target_latent"], SINGLE, what="in-painting latent")


def test_parity_ldm_uncond_our_format_is_bitwise_the_same(uncond, tmp_path) -> None:
    folder, _, data, expected = uncond
    official = load_ldm(checkpoint(folder), config=expected)
    ours = load_ldm(save_ldm(official, tmp_path / "ldm.safetensors", note="test"))
    assert ours.unet.config == expected  # the head split travels in the header
    assert ours.autoencoder.config == official.autoencoder.config
    assert ours.scale_factor == official.scale_factor
    assert read_checkpoint(tmp_path / "ldm.safetensors").kind == "ldm"
    with torch.no_grad():
        assert torch.equal(ours.eps(data["x_t"], data["t"]), official.eps(data["x_t"], data["t"]))
        z = data["ddim_eta0_samples"]
        assert torch.equal(ours.decode_latents(z), official.decode_latents(z))
    with pytest.raises(CheckpointError, match="one set of U-Net weights"):
        load_ldm(tmp_path / "ldm.safetensors", use_ema=True)


def test_parity_ldm_uncond_missing_and_misshaped_keys_are_named(uncond, tmp_path) -> None:
    folder, _, _, expected = uncond
    state = official_state(folder)

    def write(entries: dict) -> object:
        path = tmp_path / "broken.ckpt"
        torch.save({"state_dict": entries}, path)
        return path

    missing = {k: v for k, v in state.items() if k != UNET + "out.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: out\.2\.bias"):
        load_ldm(write(missing), config=expected)
    misshaped = dict(state)
    misshaped[UNET + "out.0.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"out\.0\.weight \(file \(7,\)"):
        load_ldm(write(misshaped), config=expected)
    no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_ldm(write(no_ema), use_ema=True, config=expected)
    gone = ema_key("out.2.bias")
    with pytest.raises(CheckpointError, match=gone):
        load_ldm(write({k: v for k, v in state.items() if k != gone}), use_ema=True)


def test_parity_ldm_uncond_autoencoder_precedence(uncond, tmp_path) -> None:
    """An explicit ``ae`` wins; without one the file's ``first_stage_model`` is used."""
    folder, _, _, expected = uncond
    torch.manual_seed(0)
    given = AutoencoderKL(load_ldm(checkpoint(folder), config=expected).autoencoder.config)
    assert load_ldm(checkpoint(folder), given, config=expected).autoencoder is given
    ae_folder = parity_dir() / "ae"
    if (ae_folder / "config.json").is_file():
        by_path = load_ldm(checkpoint(folder), checkpoint(ae_folder), config=expected)
        reference = load_autoencoder(checkpoint(ae_folder)).state_dict()
        for key, value in by_path.autoencoder.state_dict().items():
            assert torch.equal(value, reference[key]), key
    bare = {
        k: v for k, v in official_state(folder).items() if not k.startswith("first_stage_model.")
    }
    torch.save({"state_dict": bare}, tmp_path / "unet_only.ckpt")
    model = load_ldm(tmp_path / "unet_only.ckpt", config=expected, scale_factor=0.5)
    assert model.autoencoder is None and model.scale_factor == 0.5
    with pytest.raises(RuntimeError, match="no autoencoder"):
        model.decode_latents(torch.zeros(1, 3, 8, 8))


def test_parity_ldm_uncond_loader_tells_a_report_conditioned_file_apart() -> None:
    """The t2i file loads as a cross-attention model (its parity: tests/test_cheff_t2i.py)."""
    folder = fixture("ldm_t2i")
    unet_config = UNetConfig.from_official(config(folder)["unet"])
    assert unet_config.context_dim is not None
    model = load_ldm(checkpoint(folder), config=unet_config)
    assert model.conditioning_key == "crossattn" and model.text_encoder is not None


def test_parity_ldm_uncond_released_layout_is_ours() -> None:
    """Every U-Net key, shape and their order in the released ``cheff_diff_uncond.pt``."""
    layout_file = parity_dir().parent / "layouts" / "cheff_diff_uncond.json"
    if not layout_file.is_file():
        pytest.skip(f"needs {layout_file} (not present here)")
    layout = json.loads(layout_file.read_text())
    released = [(k[len(UNET) :], shape) for k, shape, _ in layout["entries"] if k.startswith(UNET)]
    with torch.device("meta"):  # shapes only: no 1 GB of weights to initialise
        model = UNetModel(UNCOND_RELEASED)
        paper = UNetModel(PAPER)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == released
    assert sum(p.numel() for p in model.parameters()) == layout["parameter_counts"]["unet"]
    shapes = {key: torch.empty(shape, device="meta") for key, shape in released}
    assert unet_config_from_state(shapes) == UNCOND_RELEASED
    assert unet_config_from_state(paper.state_dict()) == PAPER
    assert UNCOND_RELEASED.channel_mult == (1, 2, 3, 4) and PAPER.channel_mult == (1, 2, 4, 4)


# --------------------------------------------------------------------------- the model


def official_legacy_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """latent diffusion's ``QKVAttentionLegacy.forward``, literally."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)
    return a.reshape(bs, -1, length)


@pytest.mark.parametrize("heads", [1, 2, 3, 8])
def test_sdpa_attention_matches_the_legacy_qkv_attention(heads: int) -> None:
    generator = torch.Generator().manual_seed(heads)
    qkv = torch.randn(2, 3 * heads * 16, 37, generator=generator) * 3
    out = legacy_attention(qkv, heads)
    assert_close(out, official_legacy_attention(qkv, heads), SINGLE, what=f"{heads} heads")


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))


def test_the_unet_keeps_the_official_frequencies_out_of_its_state_dict() -> None:
    """The embedding's frequencies are a buffer (no copy from the CPU per call, which waits
    for a GPU), equal to the official CPU computation and not part of the released layout."""
    from cheff.models.unet import UNetModel, embedding_frequencies

    unet = UNetModel(tiny_config())
    assert torch.equal(unet.time_frequencies, embedding_frequencies(32))
    assert "time_frequencies" not in unet.state_dict()
    t = torch.tensor([0.0, 17.0, 999.0])
    assert torch.equal(
        timestep_embedding(t, 32, freqs=unet.time_frequencies), timestep_embedding(t, 32)
    )


def tiny_config(**changes) -> UNetConfig:
    base = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)
    )
    return dataclasses.replace(base, **changes)


def test_unet_forward_shapes_timesteps_and_dtypes() -> None:
    torch.manual_seed(0)
    model = UNetModel(tiny_config()).eval()
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        eps = model(x, torch.tensor([7, 7]))
        assert eps.shape == x.shape
        assert torch.equal(model(x, 7), eps)  # a scalar t is the whole batch's
        assert not torch.equal(model(x, 8), eps)
        half = model.to(torch.bfloat16)(x.to(torch.bfloat16), torch.tensor([7, 7]))
    assert half.dtype == torch.bfloat16
    assert (half.float() - eps).abs().max() < 0.1 * eps.abs().max()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.zeros(1, 3, 7, 8), 1)


def test_ldm_container_checks_its_conditioning() -> None:
    torch.manual_seed(0)
    unet = UNetModel(tiny_config()).eval()
    model = LatentDiffusion(unet)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eps(x, 3), unet(x, 3))
    with pytest.raises(ValueError, match="no context"):
        model.eps(x, 3, torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="conditioning_key"):
        LatentDiffusion(unet, conditioning_key="concat")


def test_config_inference_reads_every_architectural_field() -> None:
    for cfg in (
        tiny_config(num_res_blocks=2, attention_levels=(0,), conv_resample=False),
        tiny_config(channel_mult=(1, 1, 2), attention_levels=(), in_channels=4, out_channels=1),
        tiny_config(channel_mult=(2,), attention_levels=(0,)),
    ):
        with torch.device("meta"):
            state = UNetModel(cfg).state_dict()
        assert unet_config_from_state(state) == dataclasses.replace(cfg, num_head_channels=32)
    with pytest.raises(CheckpointError, match="cannot read a U-Net"):
        unet_config_from_state({"out.2.weight": torch.zeros(3, 32, 3, 3)})


def test_config_official_translation_and_checks() -> None:
    released = {
        "image_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 224,
        "attention_resolutions": [8, 4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 3, 4],
        "num_head_channels": 32,
    }
    assert UNetConfig.from_official(released) == UNCOND_RELEASED
    assert UNCOND_RELEASED.attention_resolutions == (2, 4, 8)
    assert UNCOND_RELEASED.heads(672) == 21
    assert UNetConfig.from_dict(json.loads(json.dumps(PAPER.to_dict()))) == PAPER
    by_heads = UNetConfig.from_official({**released, "num_head_channels": -1, "num_heads": 8})
    assert by_heads.num_heads == 8 and by_heads.heads(896) == 8
    with pytest.raises(ValueError, match="not supported here: use_scale_shift_norm"):
        UNetConfig.from_official({**released, "use_scale_shift_norm": True})
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetConfig(model_channels=48)
    with pytest.raises(ValueError, match="288 channels do not split into heads of 64"):
        UNetConfig(
            model_channels=96, channel_mult=(1, 3), attention_levels=(1,), num_head_channels=64
        )
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(4,))
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=4)
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"attention_resolutions": [8]})


# --------------------------------------------------------------------------- GroupNorm dtype


def _perturbed_norms(model: UNetModel) -> UNetModel:
    """Weights and biases away from 1 and 0, so that their rounding to bf16 shows."""
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    return model


def test_group_norm_in_compute_dtype_stays_in_bf16_and_near_the_fp32_rule() -> None:
    """Under bf16 autocast the official path normalises in fp32 and rounds once; the option
    normalises the bf16 input in bf16 with fp32 statistics, its weight and bias rounded to
    bf16 first (CUDA's kernel takes them in the input's dtype): one more rounding's worth."""
    from cheff.models.unet import GroupNorm32

    torch.manual_seed(0)
    norm = _perturbed_norms(GroupNorm32(32, 64, eps=1e-5))
    x = (torch.randn(3, 64, 9, 7) * 3 + 1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        official = norm(x)
        norm.in_compute_dtype = True
        fast = norm(x)
    assert official.dtype == fast.dtype == torch.bfloat16
    exact = torch.nn.functional.group_norm(
        x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5
    )

    def error(y: torch.Tensor) -> float:
        return float((y.detach().double() - exact.detach()).norm() / exact.detach().norm())

    assert error(official) < 2**-9  # one bf16 rounding (measured 0.0017)
    assert error(fast) < 1.6 * error(official)  # measured 0.0025 (1.5x)
    assert not torch.equal(fast, official)  # the option really took another path
    x32 = x.float()
    norm.in_compute_dtype = False
    reference = norm(x32)
    norm.in_compute_dtype = True
    assert torch.equal(norm(x32), reference)  # fp32 inputs: the official path, bit for bit


def test_unet_norm_in_compute_dtype_trains_like_the_official_norm_in_bf16() -> None:
    torch.manual_seed(0)
    model = _perturbed_norms(UNetModel(tiny_config()))
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    assert model.norm_in_compute_dtype is False

    def run(fast: bool, bf16: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.norm_in_compute_dtype = fast
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            eps = model(x, t)
        eps.float().square().mean().backward()
        return eps.float(), [p.grad.clone() for p in model.parameters()]

    exact, exact_grads = run(False, bf16=False)
    official, official_grads = run(False)
    fast, fast_grads = run(True)
    assert model.norm_in_compute_dtype is True
    assert not torch.equal(fast, official)  # the switch reached the GroupNorms

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).detach().norm() / b.detach().norm())

    # The bf16 step's error against fp32 is about the official path's (1.4 % and 1.5 % here).
    assert relative(fast, exact) < 1.5 * relative(official, exact) < 0.05
    errors = {
        name: [relative(g, e) for g, e in zip(grads, exact_grads) if e.norm() > 1e-6]
        for name, grads in (("official", official_grads), ("fast", fast_grads))
    }
    median = {name: sorted(values)[len(values) // 2] for name, values in errors.items()}
    assert median["fast"] < 1.5 * median["official"] < 0.1


def test_norm_in_compute_dtype_is_an_sdm_training_option() -> None:
    from cheff.config import PRESETS, apply_overrides, get_sdm_preset
    from cheff.models.autoencoder import AutoencoderKL
    from cheff.train.sdm import SDMTask

    config = apply_overrides(get_sdm_preset("tiny"), {"train.norm_in_compute_dtype": True})
    task = SDMTask(config, AutoencoderKL(PRESETS["tiny"].autoencoder), latent_side=8)
    assert task.unet.norm_in_compute_dtype is True
    plain = SDMTask(
        get_sdm_preset("tiny"), AutoencoderKL(PRESETS["tiny"].autoencoder), latent_side=8
    )
    assert plain.unet.norm_in_compute_dtype is False
    for model in ("autoencoder", "SR U-Net"):
        base = PRESETS["tiny"].train_ae if model == "autoencoder" else PRESETS["tiny"].train_sr
        with pytest.raises(ValueError, match=f"an sdm option.*{model}"):
            apply_overrides(base, {"train.norm_in_compute_dtype": True})
