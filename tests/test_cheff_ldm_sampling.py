"""The unconditional LDM sampled end to end against the official outputs: the loaded U-Net,
the schedule and the samplers together (DDIM with eta 0 and 1, in-painting, the global-RNG
draw order), at the multi-step tolerance of the fixtures' README."""

from __future__ import annotations

import pytest
import torch
from cheff_parity import MULTI_STEP, SINGLE, assert_close, checkpoint, config, fixture, io

from cheff.checkpoints import load_ldm
from cheff.diffusion import Inpaint, NoiseSchedule, ddim, ldm_buffers, paste_back
from cheff.models.unet import UNetConfig


@pytest.fixture(scope="module")
def uncond():
    folder = fixture("ldm_uncond")
    cfg, data = config(folder), io(folder)
    model = load_ldm(checkpoint(folder), config=UNetConfig.from_official(cfg["unet"]))
    schedule = NoiseSchedule.ldm(
        cfg["schedule"]["timesteps"],
        cfg["schedule"]["linear_start"],
        cfg["schedule"]["linear_end"],
    )
    # The official sampler indexes the float32 buffer stored in the checkpoint.
    alphas_cumprod = ldm_buffers(schedule)["alphas_cumprod"]
    timesteps = schedule.ddim_timesteps(cfg["ddim_steps"])
    return model, cfg, data, alphas_cumprod, timesteps


def _eps(model):
    return lambda x, t: model.eps(x, t)


def test_parity_ldm_uncond_ddim_timesteps(uncond) -> None:
    _, _, data, _, timesteps = uncond
    assert torch.equal(timesteps, data["ddim_eta0_timesteps"])


def test_parity_ldm_uncond_ddim_eta0(uncond) -> None:
    model, cfg, data, alphas_cumprod, timesteps = uncond
    intermediates, last_x0 = [data["ddim_x_T"]], []

    def record(step, t, x, x0):
        intermediates.append(x)
        last_x0[:] = [x0]

    with torch.no_grad():
        x_T = data["ddim_x_T"]
        samples = ddim(_eps(model), x_T, alphas_cumprod, timesteps, 0.0, on_step=record)
        decoded = model.decode_latents(samples)
    assert_close(samples, data["ddim_eta0_samples"], MULTI_STEP, "samples")
    assert_close(torch.stack(intermediates), data["ddim_eta0_x_inter"], MULTI_STEP, "x_inter")
    assert_close(last_x0[0], data["ddim_eta0_pred_x0_last"], MULTI_STEP, "pred_x0_last")
    assert_close(decoded, data["ddim_eta0_decoded"], MULTI_STEP, "decoded")
    assert cfg["scale_factor"] == model.scale_factor


def test_parity_ldm_uncond_ddim_eta1_with_given_noises(uncond) -> None:
    model, _, data, alphas_cumprod, timesteps = uncond
    with torch.no_grad():
        samples = ddim(
            _eps(model),
            data["ddim_x_T"],
            alphas_cumprod,
            timesteps,
            1.0,
            noises=list(data["ddim_eta1_noises"]),
        )
        decoded = model.decode_latents(samples)
    assert_close(samples, data["ddim_eta1_samples"], MULTI_STEP, "samples")
    assert_close(decoded, data["ddim_eta1_decoded"], MULTI_STEP, "decoded")


def test_parity_ldm_uncond_ddim_eta1_global_rng_order(uncond) -> None:
    """x_T first, then one draw per step after the model call, all from the global RNG."""
    model, _, data, alphas_cumprod, timesteps = uncond
    state = torch.get_rng_state()
    try:
        torch.manual_seed(int(data["ddim_eta1_rng_seed"].item()))
        x_T = torch.randn(data["ddim_x_T"].shape)
        with torch.no_grad():
            samples = ddim(_eps(model), x_T, alphas_cumprod, timesteps, 1.0)
    finally:
        torch.set_rng_state(state)
    assert_close(samples, data["ddim_eta1_rng_samples"], MULTI_STEP, "rng samples")


def test_parity_ldm_uncond_inpainting(uncond) -> None:
    model, _, data, alphas_cumprod, timesteps = uncond
    with torch.no_grad():
        known = model.encode_images(data["inpaint_target_img"], scaled=False)  # official quirk
        assert_close(known, data["inpaint_target_latent"], SINGLE, "target latent")
        inpaint = Inpaint(known, data["inpaint_mask"], list(data["inpaint_q_sample_noises"]))
        samples = ddim(
            _eps(model),
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
    kept = paste_back(samples, known, data["inpaint_mask"])
    mask = data["inpaint_mask"].expand_as(kept).bool()
    assert torch.equal(kept[mask], known[mask])  # --paste-back keeps the region exactly
