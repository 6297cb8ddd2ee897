"""The report-conditioned (t2i) LDM against the official fixture: SpatialTransformer U-Net,
text encoder, scale factor and the samplers (``pytest -k parity_ldm_t2i``)."""

from __future__ import annotations

import json

import pytest
import torch
from cheff_parity import (
    MULTI_STEP,
    SINGLE,
    assert_close,
    checkpoint,
    config,
    fixture,
    io,
    parity_dir,
)

from cheff.checkpoints import load_ldm, save_ldm, unet_config_from_state
from cheff.diffusion import Inpaint, NoiseSchedule, ddim, ldm_buffers
from cheff.models.spatial_transformer import SpatialTransformer
from cheff.models.unet import T2I_RELEASED, UNetConfig, UNetModel

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def t2i():
    folder = fixture("ldm_t2i")
    cfg, data = config(folder), io(folder)
    model = load_ldm(checkpoint(folder), config=UNetConfig.from_official(cfg["unet"]))
    schedule = NoiseSchedule.ldm(
        cfg["schedule"]["timesteps"],
        cfg["schedule"]["linear_start"],
        cfg["schedule"]["linear_end"],
    )
    alphas_cumprod = ldm_buffers(schedule)["alphas_cumprod"]
    timesteps = schedule.ddim_timesteps(cfg["ddim_steps"])
    return model, cfg, data, alphas_cumprod, timesteps


def _eps(model, context):
    return lambda x, t: model.eps(x, t, context)


def test_parity_ldm_t2i_released_layout_is_ours() -> None:
    layout_file = parity_dir().parent / "layouts" / "cheff_diff_t2i.json"
    if not layout_file.is_file():
        pytest.skip(f"needs {layout_file} (not present here)")
    layout = json.loads(layout_file.read_text())
    released = [(k[len(UNET) :], shape) for k, shape, _ in layout["entries"] if k.startswith(UNET)]
    with torch.device("meta"):
        model = UNetModel(T2I_RELEASED)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == released
    shapes = {key: torch.empty(shape, device="meta") for key, shape in released}
    assert unet_config_from_state(shapes) == T2I_RELEASED
    assert isinstance(model.middle_block[1], SpatialTransformer)


def test_parity_ldm_t2i_config_and_scale_factor(t2i) -> None:
    model, cfg, _, _, _ = t2i
    assert model.scale_factor == cfg["scale_factor"] == 0.18215
    assert model.conditioning_key == "crossattn"
    unet = cfg["unet"]
    read = unet_config_from_state(model.unet.state_dict(), num_heads=unet["num_heads"])
    assert read == model.unet.config
    assert read.context_dim == unet["context_dim"]
    assert read.transformer_depth == unet["transformer_depth"]


def test_parity_ldm_t2i_context_and_eps(t2i) -> None:
    model, _, data, _, _ = t2i
    with torch.no_grad():
        context = model.context(data["token_ids"])
        eps = model.eps(data["x_t"], data["t"], data["context"])
    assert_close(context, data["context"], SINGLE, "context")
    assert_close(eps, data["eps"], SINGLE, "eps")
    with pytest.raises(ValueError, match="needs the text encoder"):
        model.eps(data["x_t"], data["t"])


def test_parity_ldm_t2i_ddim_eta0(t2i) -> None:
    model, _, data, alphas_cumprod, timesteps = t2i
    assert torch.equal(timesteps, data["ddim_eta0_timesteps"])
    intermediates, last_x0 = [data["ddim_x_T"]], []

    def record(step, t, x, x0):
        intermediates.append(x)
        last_x0[:] = [x0]

    with torch.no_grad():
        context = model.context(data["token_ids"])
        samples = ddim(
            _eps(model, context), data["ddim_x_T"], alphas_cumprod, timesteps, 0.0, on_step=record
        )
        decoded = model.decode_latents(samples)
    assert_close(samples, data["ddim_eta0_samples"], MULTI_STEP, "samples")
    assert_close(torch.stack(intermediates), data["ddim_eta0_x_inter"], MULTI_STEP, "x_inter")
    assert_close(last_x0[0], data["ddim_eta0_pred_x0_last"], MULTI_STEP, "pred_x0_last")
    assert_close(decoded, data["ddim_eta0_decoded"], MULTI_STEP, "decoded")


def test_parity_ldm_t2i_ddim_eta1_with_given_noises(t2i) -> None:
    model, _, data, alphas_cumprod, timesteps = t2i
    with torch.no_grad():
        context = model.context(data["token_ids"])
        samples = ddim(
            _eps(model, context),
            data["ddim_x_T"],
            alphas_cumprod,
            timesteps,
            1.0,
            noises=list(data["ddim_eta1_noises"]),
        )
        decoded = model.decode_latents(samples)
    assert_close(samples, data["ddim_eta1_samples"], MULTI_STEP, "samples")
    assert_close(decoded, data["ddim_eta1_decoded"], MULTI_STEP, "decoded")


def test_parity_ldm_t2i_ddim_eta1_global_rng_order(t2i) -> None:
    model, _, data, alphas_cumprod, timesteps = t2i
    state = torch.get_rng_state()
    try:
        torch.manual_seed(int(data["ddim_eta1_rng_seed"].item()))
        x_T = torch.randn(data["ddim_x_T"].shape)
        with torch.no_grad():
            context = model.context(data["token_ids"])
            samples = ddim(_eps(model, context), x_T, alphas_cumprod, timesteps, 1.0)
    finally:
        torch.set_rng_state(state)
    assert_close(samples, data["ddim_eta1_rng_samples"], MULTI_STEP, "rng samples")


def test_parity_ldm_t2i_inpainting(t2i) -> None:
    model, _, data, alphas_cumprod, timesteps = t2i
    with torch.no_grad():
        context = model.context(data["token_ids"][:1])
        known = model.encode_images(data["inpaint_target_img"], scaled=False)  # official quirk
        assert_close(known, data["inpaint_target_latent"], SINGLE, "target latent")
        inpaint = Inpaint(known, data["inpaint_mask"], list(data["inpaint_q_sample_noises"]))
        samples = ddim(
            _eps(model, context),
            data["inpaint_x_T"],
            alphas_cumprod,
            timesteps,
            1.0,
            noises=list(data["inpaint_ddim_noises"]),
            inpaint=inpaint,
        )
        decoded = model.decode_latents(samples)
    assert_close(samples, data["inpaint_samples"], MULTI_STEP, "samples")
    assert_close(decoded, data["inpaint_decoded"], MULTI_STEP, "decoded")


def test_parity_ldm_t2i_our_format_round_trip(t2i, tmp_path) -> None:
    model, _, data, _, _ = t2i
    path = save_ldm(model, tmp_path / "t2i.safetensors")
    again = load_ldm(path)
    assert again.conditioning_key == "crossattn" and again.scale_factor == model.scale_factor
    assert again.unet.config == model.unet.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(again.context(data["token_ids"]), model.context(data["token_ids"]))
