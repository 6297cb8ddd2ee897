"""Schedules (tables of numbers) and samplers (loops over an ``eps_fn``); no network in here.

from cheff.diffusion import SAMPLERS, NoiseSchedule
schedule = NoiseSchedule.ldm()
x0 = SAMPLERS["ddim"](lambda x, t: model.eps(x, t), torch.randn(4, 3, 64, 64), schedule, 100)
"""

from __future__ import annotations

from cheff.diffusion.guidance import ContextEpsFn, classifier_free
from cheff.diffusion.samplers import (
    SAMPLERS,
    AncestralStep,
    EpsFn,
    Inpaint,
    Sampler,
    StepHook,
    ddim,
    ddpm,
    ddpm_step,
    dpmpp_2m,
    paste_back,
    solver_timesteps,
)
from cheff.diffusion.schedules import (
    DDIMTable,
    NoiseSchedule,
    ddim_table,
    ldm_buffers,
    ldm_ddim_timesteps,
    ldm_linear_betas,
    noise_with,
    noising_scales,
    q_sample,
    sr_buffers,
    sr_cosine_betas,
    sr_ddim_timesteps,
    timesteps_for,
)

__all__ = [
    "SAMPLERS",
    "AncestralStep",
    "ContextEpsFn",
    "DDIMTable",
    "EpsFn",
    "Inpaint",
    "NoiseSchedule",
    "Sampler",
    "StepHook",
    "classifier_free",
    "ddim",
    "ddim_table",
    "ddpm",
    "ddpm_step",
    "dpmpp_2m",
    "ldm_buffers",
    "ldm_ddim_timesteps",
    "ldm_linear_betas",
    "noise_with",
    "noising_scales",
    "paste_back",
    "q_sample",
    "solver_timesteps",
    "sr_buffers",
    "sr_cosine_betas",
    "sr_ddim_timesteps",
    "timesteps_for",
]
