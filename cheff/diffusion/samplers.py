"""Samplers for noise-predicting (eps) networks: plain functions that never see a network.

Every sampler takes ``eps_fn(x, t) -> eps`` with ``t`` an int64 tensor of shape (B,); the caller
wraps conditioning into it (a text context, or the SR model's ``cat([x, cond], 1)``). Nothing
here clamps the output; only the options named ``clip_x0`` clamp the x0 estimate to [-1, 1].

Randomness: ``noises`` gives each step's noise explicitly (entry k at the k-th executed step,
the noisiest first); otherwise noise comes from ``generator``, or from torch's global RNG when it
is None, drawn after the model call at every step including the last, as the official code
does. So ``torch.manual_seed(seed); x_T = torch.randn(shape)`` followed by a sampler with
``generator=None`` reproduces the official global-RNG runs.

:data:`SAMPLERS` offers each sampler with one signature, ``(eps_fn, x_T, schedule, steps, *,
generator=None, on_step=None)``; the functions below take the raw tables for parity work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from cheff.diffusion.schedules import (
    NoiseSchedule,
    ddim_table,
    noise_with,
    noising_scales,
    timesteps_for,
)

__all__ = [
    "SAMPLERS",
    "AncestralStep",
    "EpsFn",
    "Inpaint",
    "Sampler",
    "StepHook",
    "ddim",
    "ddpm",
    "ddpm_step",
    "dpmpp_2m",
    "paste_back",
    "solver_timesteps",
    "timesteps_for",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_fn(x, t)``: the predicted noise of ``x`` (B, ...) at integer steps ``t`` (B,) int64."""

Noises = Tensor | Sequence[Tensor]


class StepHook(Protocol):
    """Called after every step: ``step`` counts executed steps from 0, ``t`` is the timestep the
    network saw, ``x`` the state after the step and ``x0`` the step's estimate of the data."""

    def __call__(self, step: int, t: int, x: Tensor, x0: Tensor) -> None: ...


@dataclass(frozen=True)
class Inpaint:
    """Known content for DDIM in-/out-painting (the official ``sample_inpaint``).

    ``x0_known``: the known latent (B, C, h, w); ``mask``: 1 = keep, 0 = generate, broadcastable
    to it (the official one is (B, 1, h, w) at latent resolution). ``q_noises`` [S, ...] gives the
    noise that re-noises ``x0_known`` at step k; else it is drawn before each model call.
    """

    x0_known: Tensor
    mask: Tensor
    q_noises: Noises | None = None


def paste_back(x: Tensor, x0_known: Tensor, mask: Tensor) -> Tensor:
    """Put the known content back where ``mask`` is 1. The official sampler does not do this
    after its loop, so its kept region is only approximately the known one."""
    return mask * x0_known + (1 - mask) * x


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def _noise(
    noises: Noises | None, k: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    if noises is not None:
        return noises[k].to(device=like.device, dtype=like.dtype)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _check_noises(noises: Noises | None, steps: int, what: str) -> None:
    if noises is not None and len(noises) < steps:
        raise ValueError(f"{what}: {len(noises)} noises for {steps} steps")


@torch.no_grad()
def ddim(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    eta: float = 0.0,
    *,
    noises: Noises | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool = False,
    inpaint: Inpaint | None = None,
    on_step: StepHook | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) exactly as latent diffusion's ``DDIMSampler`` runs it.

    ``timesteps``: ascending int64, as :func:`timesteps_for` gives; they run from the last to the
    first. Per step: e = eps(x, t); x0 = (x - sqrt(1 - a) e) / sqrt(a); x = sqrt(a_prev) x0 +
    sqrt(1 - a_prev - sigma^2) e + sigma noise (tables from :func:`ddim_table`). With eta = 0 no
    noise is drawn (the official code draws and multiplies by 0, which only advances the RNG).
    ``inpaint``: before every model call x = q_sample(x0_known, t) mask + (1 - mask) x; the q
    noise is drawn before the model call and the step noise after it, as officially.
    Returns the final state (B, ...) at step 0's noise level (a trace of noise remains).
    """
    table = ddim_table(alphas_cumprod, timesteps, eta)
    scales = None  # q_sample's weights, once for every step, on the known latent's device
    if inpaint is not None:
        known = inpaint.x0_known
        scales = noising_scales(alphas_cumprod).to(known.dtype).to(known.device)
    steps = len(timesteps)
    _check_noises(noises, steps, "noises")
    if inpaint is not None:
        _check_noises(inpaint.q_noises, steps, "inpaint.q_noises")
    x = x_T
    for k, i in enumerate(range(steps - 1, -1, -1)):
        t = int(timesteps[i])
        if inpaint is not None:
            known = inpaint.x0_known
            q_noise = _noise(inpaint.q_noises, k, known, generator)
            x = noise_with(scales, known, t, q_noise) * inpaint.mask + (1 - inpaint.mask) * x
        eps = eps_fn(x, _t_batch(t, x))
        a, a_prev, sigma = (float(v[i]) for v in table[:3])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            x = x + sigma * _noise(noises, k, x, generator)
        if on_step is not None:
            on_step(k, t, x, x0)
    return x


class AncestralStep(NamedTuple):
    """One DDPM step: the new state, the posterior mean and per-sample log variance, the x0."""

    sample: Tensor
    mean: Tensor
    log_variance: Tensor  # (B,)
    x0: Tensor


def _posterior_table(schedule: NoiseSchedule) -> Tensor:
    """(T, 5) float64: sqrt(1/ab), sqrt(1/ab - 1), coef1, coef2, clipped log variance."""
    wide = schedule.to(torch.float64)  # NoiseSchedule's tables live on the CPU
    return torch.stack(
        [
            wide.sqrt_recip_alphas_cumprod,
            wide.sqrt_recipm1_alphas_cumprod,
            wide.posterior_mean_coef1,
            wide.posterior_mean_coef2,
            wide.posterior_log_variance_clipped,
        ],
        1,
    )


def _ancestral(
    eps_fn: EpsFn,
    x: Tensor,
    t: int,
    row: Tensor,
    noise: Tensor | None,
    generator: torch.Generator | None,
    clip_x0: bool,
) -> AncestralStep:
    recip, recipm1, coef1, coef2, log_variance = (float(v) for v in row)
    eps = eps_fn(x, _t_batch(t, x))
    x0 = recip * x - recipm1 * eps
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean = coef1 * x0 + coef2 * x
    if noise is None:  # drawn also at t = 0, where it is unused, to keep the official RNG order
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    sample = mean + math.exp(0.5 * log_variance) * noise if t > 0 else mean
    per_sample = torch.full((x.shape[0],), log_variance, dtype=x.dtype, device=x.device)
    return AncestralStep(sample, mean, per_sample, x0)


@torch.no_grad()
def ddpm_step(
    eps_fn: EpsFn,
    x: Tensor,
    t: int,
    schedule: NoiseSchedule,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
) -> AncestralStep:
    """One ancestral step x_t -> x_{t-1} (Ho et al. 2020) as the official SR ``p_sample``.

    x0 = sqrt(1/ab) x - sqrt(1/ab - 1) eps, clamped to [-1, 1] when ``clip_x0`` (SR default);
    mean = coef1 x0 + coef2 x; sample = mean + exp(log_variance / 2) noise, or mean at t = 0.
    """
    row = _posterior_table(schedule)[t]
    return _ancestral(eps_fn, x, t, row, noise, generator, clip_x0)


@torch.no_grad()
def ddpm(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    noises: Noises | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    on_step: StepHook | None = None,
) -> Tensor:
    """Ancestral sampling over every step t = T-1, ..., 0 (:func:`ddpm_step` each time).

    ``clip_x0`` defaults to True as the official SR sampler; turn it off for data that are not
    in [-1, 1] (such as LDM latents).
    """
    table = _posterior_table(schedule)
    steps = schedule.num_timesteps
    _check_noises(noises, steps, "noises")
    x = x_T
    for k, t in enumerate(range(steps - 1, -1, -1)):
        noise = None if noises is None else _noise(noises, k, x, None)
        x, _, _, x0 = _ancestral(eps_fn, x, t, table[t], noise, generator, clip_x0)
        if on_step is not None:
            on_step(k, t, x, x0)
    return x


def solver_timesteps(
    alphas_cumprod: Tensor, steps: int, spacing: Literal["logsnr", "time"] = "logsnr"
) -> Tensor:
    """Descending int64 timesteps from T-1 to 0 for a fast solver.

    "logsnr": uniform in lambda = log(sqrt(ab) / sqrt(1 - ab)), each point moved to the integer
    t of nearest lambda (the networks know integer steps only; the solver then uses the exact
    lambda of each chosen t); rounding may merge points for large ``steps``, so fewer may come
    back. "time": round(linspace(T-1, 0, steps)), uniform in t.
    """
    num = alphas_cumprod.shape[0]
    if not 1 <= steps <= num:
        raise ValueError(f"steps must be in [1, {num}], got {steps}")
    if spacing == "time":
        return torch.linspace(num - 1, 0, steps, dtype=torch.float64).round().to(torch.int64)
    if spacing != "logsnr":
        raise ValueError(f"spacing {spacing!r}: choose 'time' or 'logsnr'")
    ab = alphas_cumprod.detach().to("cpu", torch.float64)
    lam = 0.5 * (ab.log() - torch.log1p(-ab))
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(1)
    return torch.unique_consecutive(nearest)


@torch.no_grad()
def dpmpp_2m(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    spacing: Literal["logsnr", "time"] = "logsnr",
    on_step: StepHook | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), deterministic, ``steps`` network calls.

    Discrete-time VP form: alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t =
    log(alpha_t / sigma_t), data prediction x0 = (x - sigma_t eps) / alpha_t. Between calls at
    t_i and t_{i+1}, h = lambda_{i+1} - lambda_i and x <- (sigma_{i+1} / sigma_i) x - alpha_{i+1}
    (e^{-h} - 1) D with D = x0 on the first step and D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},
    r = h_{i-1} / h, afterwards. After the last call (t = 0) the output is that call's x0 (the
    final denoise, as k-diffusion and diffusers do). Timesteps: :func:`solver_timesteps`,
    uniform in log-SNR by default. Uniform in t is much worse on both Cheff schedules: lambda
    jumps by ~2 over the last few t (ab[0] is close to 1), the ratio r becomes small and the
    extrapolation 1/(2r) overshoots (Gaussian check, LDM schedule, 20 calls: output std +16 %
    uniform in t, +1 % uniform in log-SNR).
    """
    ts = solver_timesteps(alphas_cumprod, steps, spacing)
    ab = alphas_cumprod.detach().to("cpu", torch.float64)
    x = x_T
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i, t in enumerate(ts.tolist()):
        alpha, sigma = math.sqrt(float(ab[t])), math.sqrt(1 - float(ab[t]))
        x0 = (x - sigma * eps_fn(x, _t_batch(t, x))) / alpha
        if i == len(ts) - 1:
            x = x0
        else:
            s = int(ts[i + 1])
            alpha_s, sigma_s = math.sqrt(float(ab[s])), math.sqrt(1 - float(ab[s]))
            h = math.log(alpha_s / sigma_s) - math.log(alpha / sigma)
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_s / sigma) * x - alpha_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if on_step is not None:
            on_step(i, t, x, x0)
    return x


class Sampler(Protocol):
    """The one signature of every :data:`SAMPLERS` entry: ``steps`` is the step budget."""

    def __call__(
        self,
        eps_fn: EpsFn,
        x_T: Tensor,
        schedule: NoiseSchedule,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        on_step: StepHook | None = None,
    ) -> Tensor: ...


def _ddim_entry(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM on the official step rule (``steps`` 150 -> 167 calls on T = 1000, see
    :func:`timesteps_for`); eta 0 unless given (the official LDM wrappers use 1.0)."""
    # The official tables index the float32 checkpoint buffer, so index that here too.
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)
    timesteps = schedule.ddim_timesteps(steps)
    return ddim(eps_fn, x_T, alphas_cumprod, timesteps, eta, generator=generator, on_step=on_step)


def _ddpm_entry(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
    clip_x0: bool = False,
) -> Tensor:
    """DDPM over all T steps; ``steps`` must be T (use DDIM with eta 1 for fewer). No clipping
    unless asked: LDM latents leave [-1, 1]; the official SR sampler clips (``clip_x0=True``)."""
    if steps != schedule.num_timesteps:
        raise ValueError(f"ddpm runs all {schedule.num_timesteps} steps, not {steps}")
    return ddpm(eps_fn, x_T, schedule, generator=generator, clip_x0=clip_x0, on_step=on_step)


def _dpmpp_2m_entry(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
    spacing: Literal["logsnr", "time"] = "logsnr",
) -> Tensor:
    """DPM-Solver++(2M) with ``steps`` network calls; deterministic, ``generator`` unused."""
    del generator
    return dpmpp_2m(eps_fn, x_T, schedule.alphas_cumprod, steps, spacing=spacing, on_step=on_step)


SAMPLERS: dict[str, Sampler] = {
    "ddim": _ddim_entry,
    "ddpm": _ddpm_entry,
    "dpmpp_2m": _dpmpp_2m_entry,
}
"""Every sampler under one signature, by name (``cheff sample --sampler`` lists these)."""
