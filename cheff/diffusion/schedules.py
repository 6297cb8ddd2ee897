"""Noise schedules of the Cheff cascade as plain tensors; nothing here knows of a network.

Two schedules exist (``../shared/cheff-official/FORMAT.md`` 3c and 4):

- the latent diffusion models: T = 1000, "linear" in latent diffusion's sense (linear in
  sqrt(beta)) from 0.0015 to 0.0295, computed in float64 and stored as float32 buffers;
- the super-resolution model: cosine (Nichol & Dhariwal 2021), T = 2000, s = 0.008, computed
  in float32 throughout.

:class:`NoiseSchedule` holds betas and alphas_cumprod in float64 (the SR values are the float32
ones, widened exactly); :func:`ldm_buffers` and :func:`sr_buffers` redo the official arithmetic
in the official precision, so both match the official arrays bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

LDM_DDIM_OFFSET = 1  # latent diffusion feeds DDIM step c*k + 1 ("uniform" + 1); SR feeds c*k


def ldm_linear_betas(
    timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0295
) -> Tensor:
    """Latent diffusion's "linear" betas: linear in sqrt(beta), float64, shape (T,).

    Cheff ends at 0.0295 so that the last step is close to pure noise: sqrt(alpha_bar_T) is
    0.00178 there, against 0.0119 with the 0.0195 of common latent diffusion configs.
    """
    root = torch.linspace(
        math.sqrt(linear_start), math.sqrt(linear_end), timesteps, dtype=torch.float64
    )
    return root**2


def sr_cosine_betas(timesteps: int = 2000, s: float = 0.008) -> Tensor:
    """The SR cosine betas exactly as the official code computes them: float32, shape (T,)."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float32)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return torch.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 1e-4, 0.9999)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).

    ``betas`` and ``alphas_cumprod`` (ab) are 1-D tensors of length T, float64 from the
    constructors; every derived table is computed on demand in their dtype. ``ddim_offset`` is
    the shift the official DDIM adds to its evenly spaced steps (1 for the LDMs, 0 for SR).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    ddim_offset: int = 0

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError(
                f"betas {tuple(self.betas.shape)} and alphas_cumprod "
                f"{tuple(self.alphas_cumprod.shape)} must be 1-D and of one length"
            )

    @classmethod
    def ldm(
        cls, timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0295
    ) -> NoiseSchedule:
        """The schedule of both Cheff LDMs (FORMAT.md 3c)."""
        betas = ldm_linear_betas(timesteps, linear_start, linear_end)
        return cls(betas, torch.cumprod(1 - betas, 0), ddim_offset=LDM_DDIM_OFFSET)

    @classmethod
    def sr_cosine(cls, timesteps: int = 2000, s: float = 0.008) -> NoiseSchedule:
        """The SR schedule (FORMAT.md 4): float32 arithmetic, widened exactly to float64."""
        betas = sr_cosine_betas(timesteps, s)
        return cls(betas.double(), torch.cumprod(1 - betas, 0).double(), ddim_offset=0)

    def to(self, dtype: torch.dtype) -> NoiseSchedule:
        """The same schedule with its tables in ``dtype`` (derived tables follow that dtype)."""
        return replace(
            self, betas=self.betas.to(dtype), alphas_cumprod=self.alphas_cumprod.to(dtype)
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def summary(self) -> str:
        """A short description for records (an image's provenance, run summaries): the steps
        and the signal left at the last one, which tell the Cheff schedules apart."""
        last = float(self.alphas_cumprod[-1])
        return f"{self.num_timesteps} steps, alphas_cumprod[-1] {last:.4g}"

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """ab_{t-1}, with ab_{-1} = 1."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def log_one_minus_alphas_cumprod(self) -> Tensor:
        return torch.log(1 - self.alphas_cumprod)

    @property
    def sqrt_recip_alphas_cumprod(self) -> Tensor:
        return (1 / self.alphas_cumprod).sqrt()

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> Tensor:
        return (1 / self.alphas_cumprod - 1).sqrt()

    @property
    def posterior_variance(self) -> Tensor:
        """Var q(x_{t-1} | x_t, x_0) (v_posterior = 0); exactly 0 at t = 0."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log of the posterior variance, floored at 1e-20 so that t = 0 stays finite."""
        return torch.log(self.posterior_variance.clamp(min=1e-20))

    @property
    def posterior_mean_coef1(self) -> Tensor:
        """Weight of x_0 in the posterior mean."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> Tensor:
        """Weight of x_t in the posterior mean."""
        return (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; ``t`` an int or (B,) int64."""
        return q_sample(self.alphas_cumprod, x0, t, noise)

    def ddim_timesteps(self, steps: int, exact: bool = False) -> Tensor:
        """The official DDIM steps for this schedule; see :func:`timesteps_for`."""
        return timesteps_for(
            steps, exact, num_timesteps=self.num_timesteps, offset=self.ddim_offset
        )


def noising_scales(alphas_cumprod: Tensor) -> Tensor:
    """(2, T) float64 on the CPU: sqrt(ab) and sqrt(1 - ab), the weights of x0 and of the noise
    in x_t. A training loop casts them to float32 once and keeps them on its device
    (:func:`noise_with`): no step then computes in float64, which Apple's MPS does not have,
    and the weights are the same numbers q_sample uses."""
    ab = alphas_cumprod.detach().to("cpu", torch.float64)
    return torch.stack([ab.sqrt(), (1 - ab).sqrt()])


def noise_with(scales: Tensor, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise from :func:`noising_scales` (on any device,
    in any dtype); ``t`` an int, or (B,) int64 for one step per sample."""
    weights = scales[:, torch.as_tensor(t, device=scales.device)]
    if weights.ndim > 1:  # one step per sample: broadcast over the non-batch dimensions
        weights = weights.reshape(2, -1, *([1] * (x0.ndim - 1)))
    scale, spread = weights.to(x0.dtype).to(x0.device)
    return scale * x0 + spread * noise


def q_sample(alphas_cumprod: Tensor, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
    """Noise ``x0`` to step ``t`` (an int, or (B,) int64 for one step per sample); the weights
    are computed in float64, then cast to ``x0``'s dtype."""
    return noise_with(noising_scales(alphas_cumprod), x0, t, noise)


LDM_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# The SR model's names for the same tables; it stores no log(1 - ab).
_SR_NAMES = {
    "posterior_variance": "post_var",
    "posterior_log_variance_clipped": "post_log_var_clipped",
    "posterior_mean_coef1": "post_mean_coef1",
    "posterior_mean_coef2": "post_mean_coef2",
}


def ldm_buffers(schedule: NoiseSchedule) -> dict[str, Tensor]:
    """The 12 float32 schedule buffers of an LDM checkpoint (latent diffusion's
    ``register_schedule``): computed in float64, then cast, as the official code does."""
    wide = schedule.to(torch.float64)
    return {name: getattr(wide, name).to(torch.float32) for name in LDM_BUFFER_NAMES}


def sr_buffers(schedule: NoiseSchedule) -> dict[str, Tensor]:
    """The SR model's schedule tables under its names, computed in float32 like the official
    code (float64 arithmetic here would move post_mean_coef1 near t = 0 by ~2e-4 relative)."""
    narrow = schedule.to(torch.float32)
    return {
        _SR_NAMES.get(name, name): getattr(narrow, name)
        for name in LDM_BUFFER_NAMES
        if name != "log_one_minus_alphas_cumprod"
    }


def timesteps_for(
    steps: int, exact: bool = False, *, num_timesteps: int = 1000, offset: int = LDM_DDIM_OFFSET
) -> Tensor:
    """DDIM timesteps, ascending int64, as the official "uniform" rule picks them.

    The official rule takes every c-th step with c = T // steps, so the number of network
    calls is ceil(T / c), which exceeds ``steps`` when steps does not divide T: asking 150 on
    T = 1000 gives c = 6 and 167 calls (T = 2000: c = 13, 154 calls). ``exact=True`` returns
    exactly ``steps`` entries, floor(k T / steps) + offset, identical to the official rule
    whenever steps divides T. ``offset`` is 1 for the LDMs (their +1 shift) and 0 for SR.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if exact:
        base = torch.div(torch.arange(steps) * num_timesteps, steps, rounding_mode="floor")
    else:
        base = torch.arange(0, num_timesteps, num_timesteps // steps)
    if int(base[-1]) + offset >= num_timesteps:
        raise ValueError(f"step {int(base[-1]) + offset} is past T - 1 = {num_timesteps - 1}")
    return (base + offset).to(torch.int64)


def ldm_ddim_timesteps(steps: int, num_timesteps: int = 1000) -> Tensor:
    """LDM DDIM steps: range(0, T, T // steps) + 1, e.g. (1, 201, 401, 601, 801) for 5."""
    return timesteps_for(steps, num_timesteps=num_timesteps, offset=LDM_DDIM_OFFSET)


def sr_ddim_timesteps(steps: int, num_timesteps: int = 2000) -> Tensor:
    """SR DDIM steps: range(0, T, T // steps) without a shift, e.g. (0, 400, ..., 1600)."""
    return timesteps_for(steps, num_timesteps=num_timesteps, offset=0)


class DDIMTable(NamedTuple):
    """Per-step DDIM coefficients, index i matching ``timesteps[i]`` (ascending), float64."""

    alphas: Tensor  # ab at timesteps[i]
    alphas_prev: Tensor  # ab at timesteps[i - 1]; ab[0] for i = 0
    sigmas: Tensor  # noise scale of each step
    sqrt_one_minus_alphas: Tensor


def check_eta(eta: float, what: str = "eta") -> float:
    """DDIM's eta as a float: a finite number >= 0 (0 deterministic, 1 DDPM-like). NaN gave
    NaN latents, which became black PNGs; a negative eta skipped the noise term."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: a number >= 0, not {eta!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (0: deterministic), got {eta}")
    return value


def ddim_table(alphas_cumprod: Tensor, timesteps: Tensor, eta: float = 0.0) -> DDIMTable:
    """The official DDIM coefficients (Song et al. 2021, eq. 16), in float64.

    sigma_i = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)). Pass the float32 checkpoint
    buffer (``schedule.alphas_cumprod.float()``) to reproduce the official tables: they index
    that buffer. The first step's a_prev is ab[0], not 1, so the last update lands on step 0's
    noise level and the output keeps a trace of noise (sqrt(1 - ab[0]) = 0.039 for the LDMs).
    """
    eta = check_eta(eta)
    ab = alphas_cumprod.detach().to("cpu", torch.float64)  # read per step: keep it on the host
    index = timesteps.to(device=ab.device, dtype=torch.int64)
    alphas = ab[index]
    alphas_prev = torch.cat([ab[:1], ab[index[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMTable(alphas, alphas_prev, sigmas, (1 - alphas).sqrt())
