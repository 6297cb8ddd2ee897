"""Schedules and samplers of ``cheff.diffusion``, checked without any network.

Parity: every array of the official ``schedules.safetensors`` (``pytest -k parity_schedules``).
Samplers: an exact noise predictor for Gaussian data, eps*(x_t, t) = sqrt(1 - ab) (x_t -
sqrt(ab) mu) / (ab s^2 + 1 - ab), turns sign or scale bugs into wrong output moments.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from cheff_parity import MULTI_STEP, SINGLE, assert_close, config, fixture, io, parity_dir
from safetensors.torch import load_file
from torch import Tensor

from cheff.diffusion import (
    SAMPLERS,
    Inpaint,
    NoiseSchedule,
    ddim,
    ddim_table,
    ddpm,
    ddpm_step,
    dpmpp_2m,
    ldm_buffers,
    ldm_ddim_timesteps,
    noise_with,
    noising_scales,
    paste_back,
    q_sample,
    solver_timesteps,
    sr_buffers,
    sr_ddim_timesteps,
    timesteps_for,
)

MU, S = 0.3, 0.5  # the Gaussian data: N(MU, S^2) per element
LDM = NoiseSchedule.ldm()
SR = NoiseSchedule.sr_cosine()


# -- official arrays ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official() -> dict[str, Tensor]:
    path = parity_dir() / "schedules.safetensors"
    if not path.is_file():
        pytest.skip(f"needs the official {path} (set CHEFF_PARITY_DIR; not present here)")
    return load_file(str(path))


DDIM_KEY = re.compile(r"(ldm|sr)\.ddim(\d+)_eta([\d.]+)\.(\w+)")


def ddim_groups(arrays: dict[str, Tensor], family: str) -> dict[str, tuple[int, float, set[str]]]:
    """``<family>.ddim{S}_eta{eta}`` -> (S, eta, array names) for every such group in the file;
    S is read from the keys, since another fixture set has other step counts."""
    groups: dict[str, tuple[int, float, set[str]]] = {}
    for key in arrays:
        match = DDIM_KEY.fullmatch(key)
        if match and match[1] == family:
            prefix = key.rsplit(".", 1)[0]
            groups.setdefault(prefix, (int(match[2]), float(match[3]), set()))[2].add(match[4])
    return groups


def test_parity_schedules_ldm_arrays(official: dict[str, Tensor]) -> None:
    assert LDM.betas.dtype == official["ldm.betas_float64"].dtype == torch.float64
    assert_close(LDM.betas, official["ldm.betas_float64"], SINGLE, "betas float64")
    assert_close(LDM.alphas_cumprod, official["ldm.alphas_cumprod_float64"], SINGLE, "ab float64")
    buffers = ldm_buffers(LDM)
    stored = {k.removeprefix("ldm.buffer."): v for k, v in official.items() if ".buffer." in k}
    assert set(buffers) == set(stored)
    for name, ref in stored.items():
        assert buffers[name].dtype == ref.dtype, name
        assert_close(buffers[name], ref, SINGLE, f"ldm buffer {name}")


def test_parity_schedules_sr_arrays(official: dict[str, Tensor]) -> None:
    tables = sr_buffers(SR)
    stored = {
        k.removeprefix("sr."): v
        for k, v in official.items()
        if k.startswith("sr.") and not DDIM_KEY.fullmatch(k)
    }
    assert set(tables) == set(stored)
    for name, ref in stored.items():
        assert tables[name].dtype == ref.dtype, name
        assert_close(tables[name], ref, SINGLE, f"sr {name}")


@pytest.mark.parametrize("family", ["ldm", "sr"])
def test_parity_schedules_ddim_tables(official: dict[str, Tensor], family: str) -> None:
    groups = ddim_groups(official, family)
    assert groups, f"no {family}.ddim* arrays in the file"
    if family == "ldm":  # the official tables index the float32 checkpoint buffer
        alphas_cumprod, rule = ldm_buffers(LDM)["alphas_cumprod"], ldm_ddim_timesteps
        names = {"alphas": "alphas", "alphas_prev": "alphas_prev"}
    else:
        alphas_cumprod, rule = sr_buffers(SR)["alphas_cumprod"], sr_ddim_timesteps
        names = {"alpha_cumprod": "alphas", "alphas_cumprod_prev": "alphas_prev"}
    names |= {"sigmas": "sigmas", "sqrt_one_minus_alphas": "sqrt_one_minus_alphas"}
    for prefix, (steps, eta, stored) in groups.items():
        timesteps, ref_steps = rule(steps), official[f"{prefix}.timesteps"]
        assert timesteps.dtype == ref_steps.dtype == torch.int64
        assert torch.equal(timesteps, ref_steps), prefix
        table = ddim_table(alphas_cumprod, timesteps, eta)._asdict()
        for name in stored - {"timesteps"}:
            ref = official[f"{prefix}.{name}"]
            assert_close(table[names[name]].to(ref.dtype), ref, SINGLE, f"{prefix}.{name}")


def test_parity_schedules_cover_every_array(official: dict[str, Tensor]) -> None:
    """No array in the file goes unchecked by the tests above."""
    known = {"ldm.betas_float64", "ldm.alphas_cumprod_float64"}
    known |= {f"ldm.buffer.{name}" for name in ldm_buffers(LDM)}
    known |= {f"sr.{name}" for name in sr_buffers(SR)}
    assert {k for k in official if not DDIM_KEY.fullmatch(k)} - known == set()


def test_ddim_replays_the_official_trajectory() -> None:
    """Feeding back the noise implied by the official eta-0 trajectory reproduces it, and the
    last x0 estimate (independent of the replay) matches the official one."""
    folder = fixture("ldm_uncond")
    arrays, settings = io(folder), config(folder)["schedule"]
    schedule = NoiseSchedule.ldm(
        settings["timesteps"], settings["linear_start"], settings["linear_end"]
    )
    alphas_cumprod = ldm_buffers(schedule)["alphas_cumprod"]
    steps = len(arrays["ddim_eta0_timesteps"])
    timesteps = ldm_ddim_timesteps(steps, schedule.num_timesteps)
    assert torch.equal(timesteps, arrays["ddim_eta0_timesteps"])
    table = ddim_table(alphas_cumprod, timesteps)
    inter = arrays["ddim_eta0_x_inter"].double()
    implied = []
    for k, i in enumerate(range(steps - 1, -1, -1)):
        a, a_prev = float(table.alphas[i]), float(table.alphas_prev[i])
        ratio = math.sqrt(a_prev / a)
        implied.append(
            (inter[k + 1] - ratio * inter[k]) / (math.sqrt(1 - a_prev) - ratio * math.sqrt(1 - a))
        )
    seen: list[tuple[int, Tensor, Tensor]] = []
    out = ddim(
        lambda x, t: implied[len(seen)].to(x.dtype),
        arrays["ddim_x_T"],
        alphas_cumprod,
        timesteps,
        on_step=lambda k, t, x, x0: seen.append((t, x, x0)),
    )
    assert [t for t, _, _ in seen] == timesteps.flip(0).tolist()
    assert_close(out, arrays["ddim_eta0_samples"], MULTI_STEP, "samples")
    assert_close(seen[-1][2], arrays["ddim_eta0_pred_x0_last"], MULTI_STEP, "last x0")
    for k, (_, x, _) in enumerate(seen):
        assert_close(x, arrays["ddim_eta0_x_inter"][k + 1], MULTI_STEP, f"x after step {k}")


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("linear_end", "expected", "within"), [(0.0195, 0.0119, 1e-4), (0.0295, 0.00178, 1e-5)]
)
def test_last_step_signal_left(linear_end: float, expected: float, within: float) -> None:
    """The paper's point: 0.0195 leaves 1.2 % of the signal at t = T, Cheff's 0.0295 0.18 %."""
    schedule = NoiseSchedule.ldm(linear_end=linear_end)
    assert float(schedule.sqrt_alphas_cumprod[-1]) == pytest.approx(expected, abs=within)


@pytest.mark.parametrize("schedule", [LDM, SR], ids=["ldm", "sr"])
def test_schedule_is_monotone_and_consistent(schedule: NoiseSchedule) -> None:
    ab = schedule.alphas_cumprod
    assert ab.dtype == schedule.betas.dtype == torch.float64
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < float(ab[-1]) < float(ab[0]) < 1
    assert torch.equal(schedule.alphas_cumprod_prev[1:], ab[:-1])
    assert float(schedule.posterior_variance[0]) == 0.0
    assert float(schedule.posterior_log_variance_clipped[0]) == pytest.approx(math.log(1e-20))


def test_q_sample_takes_one_step_per_sample() -> None:
    x0, noise = torch.ones(2, 3, 4, 4), torch.randn(2, 3, 4, 4, generator=gen(0))
    both = q_sample(LDM.alphas_cumprod, x0, torch.tensor([0, 999]), noise)
    for b, t in enumerate([0, 999]):
        assert torch.equal(both[b], LDM.q_sample(x0[b], t, noise[b]))
    ab = float(LDM.alphas_cumprod[999])
    assert torch.allclose(both[1], math.sqrt(ab) + math.sqrt(1 - ab) * noise[1])


def test_the_float32_weights_of_training_noise_exactly_as_q_sample() -> None:
    """The weights a training loop keeps on its device in float32 (no float64 there: MPS has
    none) give q_sample's x_t bit for bit, on both schedules; they are computed on the CPU
    whatever the table's device."""
    x0 = torch.randn(5, 3, 4, 4, generator=gen(1))
    noise = torch.randn(5, 3, 4, 4, generator=gen(2))
    for table in (LDM.alphas_cumprod, SR.alphas_cumprod.float()):
        scales = noising_scales(table)
        assert scales.dtype == torch.float64 and scales.device.type == "cpu"
        t = torch.randint(0, len(table), (5,), generator=gen(3))
        wanted = torch.stack([q_sample(table, x0[b], int(t[b]), noise[b]) for b in range(5)])
        assert torch.equal(noise_with(scales.float(), x0, t, noise), wanted)
        assert torch.equal(noise_with(scales, x0[0], int(t[0]), noise[0]), wanted[0])


def test_official_step_count() -> None:
    """Asking the official DDIM for 150 steps runs 167 network calls; exact=True runs 150."""
    assert len(timesteps_for(150)) == 167 == len(range(0, 1000, 1000 // 150))
    assert torch.equal(timesteps_for(100), torch.arange(1, 1000, 10))
    exact = timesteps_for(150, exact=True)
    assert len(exact) == len(exact.unique()) == 150 and exact[0] == 1 and exact[-1] < 1000
    assert torch.equal(timesteps_for(100, exact=True), timesteps_for(100))
    assert len(SR.ddim_timesteps(150)) == 154
    calls = []
    SAMPLERS["ddim"](lambda x, t: calls.append(t) or x * 0, torch.zeros(1, 2), LDM, 150)
    assert len(calls) == 167
    with pytest.raises(ValueError, match="past T - 1"):
        timesteps_for(1000)  # 1..1000: the official code fails here too (index 1000)


# -- samplers on Gaussian data -----------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_eps(schedule: NoiseSchedule):
    """The exact noise predictor for data N(MU, S^2) under ``schedule``."""
    ab_all = schedule.alphas_cumprod

    def eps(x: Tensor, t: Tensor) -> Tensor:
        ab = ab_all[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)

    return eps


def start_noise(shape: tuple[int, ...] = (8192, 8)) -> Tensor:
    """N(0, 1) quantiles in random order: zero sampling error in the start's mean and std, so
    a deterministic sampler's output moments show its own error only."""
    n = math.prod(shape)
    quantiles = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return quantiles[torch.randperm(n, generator=gen(1))].reshape(shape).float()


def ddpm_chain_moments(schedule: NoiseSchedule) -> tuple[float, float]:
    """Mean and std of DDPM's output with the exact predictor, propagated in closed form.

    The posterior variance ("fixed small") ignores the spread of x0 given x_t, so even an exact
    model under-disperses: std 0.4926 (-1.5 %) for S = 0.5 on the LDM schedule."""
    mean, var = 0.0, 1.0
    for t in range(schedule.num_timesteps - 1, -1, -1):
        ab = float(schedule.alphas_cumprod[t])
        gain = S**2 * math.sqrt(ab) / (ab * S**2 + 1 - ab)  # E[x0 | x_t] = gain x_t + shift
        shift = MU - gain * math.sqrt(ab) * MU
        coef1, coef2 = (
            float(schedule.posterior_mean_coef1[t]),
            float(schedule.posterior_mean_coef2[t]),
        )
        mean = (coef1 * gain + coef2) * mean + coef1 * shift
        var = (coef1 * gain + coef2) ** 2 * var + float(schedule.posterior_variance[t])
    return mean, math.sqrt(var)


def assert_moments(out: Tensor, mean: float, std: float, rel: float = 0.02) -> None:
    got = (float(out.mean()), float(out.std()))
    assert got[0] == pytest.approx(mean, rel=rel) and got[1] == pytest.approx(std, rel=rel), (
        f"mean {got[0]:.4f} std {got[1]:.4f}, expected {mean:.4f} {std:.4f}"
    )


def test_ddpm_reproduces_the_gaussian() -> None:
    mean, std = ddpm_chain_moments(LDM)
    assert (mean, std) == pytest.approx((MU, 0.4926), abs=1e-4)
    out = ddpm(gaussian_eps(LDM), start_noise(), LDM, generator=gen(2), clip_x0=False)
    assert_moments(out, mean, std)


def test_ddim_all_steps_reproduces_the_gaussian() -> None:
    out = ddim(gaussian_eps(LDM), start_noise(), LDM.alphas_cumprod, torch.arange(1000))
    assert_moments(out, MU, S)


@pytest.mark.parametrize("schedule", [LDM, SR], ids=["ldm", "sr"])
def test_dpmpp_2m_20_calls_reproduces_the_gaussian(schedule: NoiseSchedule) -> None:
    calls = []

    def eps(x: Tensor, t: Tensor) -> Tensor:
        calls.append(int(t[0]))
        return gaussian_eps(schedule)(x, t)

    out = dpmpp_2m(eps, start_noise(), schedule.alphas_cumprod, 20)
    assert calls == solver_timesteps(schedule.alphas_cumprod, 20).tolist()
    assert calls[0] == schedule.num_timesteps - 1 and calls[-1] == 0
    # SR: its last two betas are clipped (ab falls from 6e-7 to 6e-11), so log-SNR spacing puts
    # several points on t = 1989..1999 where rounding merges them: 16 calls, and a coarser result.
    assert len(calls) == (20 if schedule is LDM else 16)
    assert_moments(out, MU, S, rel=0.02 if schedule is LDM else 0.04)


def test_solver_timesteps() -> None:
    for spacing in ("logsnr", "time"):
        ts = solver_timesteps(LDM.alphas_cumprod, 20, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    assert len(solver_timesteps(LDM.alphas_cumprod, 1)) == 1


# -- the registry contract: every entry ---------------------------------------------------------

BUDGET = {"ddpm": LDM.num_timesteps}  # others: 100 calls or so


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registry_contract(name: str) -> None:
    """Shape and dtype kept, one generator seed one output, steps reported in order, and the
    Gaussian data come back within 5 % at a modest budget."""
    sampler, steps = SAMPLERS[name], BUDGET.get(name, 100)
    x_T = start_noise((1024, 16)).double()
    seen: list[int] = []
    out = sampler(
        gaussian_eps(LDM), x_T, LDM, steps, generator=gen(3), on_step=lambda k, *_: seen.append(k)
    )
    again = sampler(gaussian_eps(LDM), x_T, LDM, steps, generator=gen(3))
    assert out.shape == x_T.shape and out.dtype == x_T.dtype
    assert torch.equal(out, again)
    assert seen == list(range(len(seen))) and len(seen) >= min(steps, 90)
    assert_moments(out, MU, S, rel=0.05)


# -- randomness --------------------------------------------------------------------------------


def toy_eps(x: Tensor, t: Tensor) -> Tensor:
    """Any smooth function of (x, t) will do for the bookkeeping tests."""
    return torch.tanh(x) * (t.float() / 1000).reshape(-1, *([1] * (x.ndim - 1)))


AC32 = ldm_buffers(LDM)["alphas_cumprod"]
STEPS5 = ldm_ddim_timesteps(5)


def test_ddim_eta0_is_deterministic_and_draws_nothing() -> None:
    x_T = torch.randn(2, 3, 8, 8, generator=gen(4))
    with torch.random.fork_rng():
        before = torch.get_rng_state()
        first = ddim(toy_eps, x_T, AC32, STEPS5)
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, ddim(toy_eps, x_T, AC32, STEPS5))


def test_ddim_noise_order_generator_and_global_rng() -> None:
    """Noise is drawn after each model call, last step included: explicit ``noises`` drawn in
    that order give the same result as a generator, and as the global RNG after a seed."""
    shape = (2, 3, 8, 8)
    g = gen(5)
    x_T = torch.randn(shape, generator=g)
    noises = torch.stack([torch.randn(shape, generator=g) for _ in range(5)])
    g = gen(5)
    x_T_again = torch.randn(shape, generator=g)
    by_generator = ddim(toy_eps, x_T_again, AC32, STEPS5, 1.0, generator=g)
    explicit = ddim(toy_eps, x_T, AC32, STEPS5, 1.0, noises=noises)
    assert torch.equal(by_generator, explicit)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        by_global = ddim(toy_eps, torch.randn(shape), AC32, STEPS5, 1.0)
    assert torch.equal(by_global, explicit)


def test_ddpm_is_its_steps() -> None:
    """``ddpm`` is ``ddpm_step`` from T-1 to 0; t = 0 returns the mean; the log variance there is
    the clipped log(1e-20)."""
    schedule = NoiseSchedule(LDM.betas[:6], LDM.alphas_cumprod[:6])
    x_T = torch.randn(2, 1, 4, 4, generator=gen(6))
    noises = torch.randn(6, 2, 1, 4, 4, generator=gen(7))
    x = x_T
    for k, t in enumerate(range(5, -1, -1)):
        step = ddpm_step(toy_eps, x, t, schedule, noise=noises[k])
        spread = math.exp(0.5 * float(schedule.posterior_log_variance_clipped[t]))
        expected = step.mean + spread * noises[k]
        assert torch.equal(step.sample, expected if t > 0 else step.mean)
        x = step.sample
    assert float(step.log_variance[0]) == pytest.approx(math.log(1e-20))
    assert step.log_variance.shape == (2,)
    assert torch.equal(ddpm(toy_eps, x_T, schedule, noises=noises), x)


# -- in-painting -------------------------------------------------------------------------------


def test_inpaint_keep_everything_feeds_the_renoised_known_latent() -> None:
    """mask = 1: the network sees exactly q_sample(x0_known, t_k, q_noise_k) at every step, and
    paste_back returns the known latent exactly."""
    x0_known = torch.randn(2, 3, 8, 8, generator=gen(8))
    q_noises = torch.randn(5, 2, 3, 8, 8, generator=gen(9))
    mask = torch.ones(2, 1, 8, 8)
    seen: list[Tensor] = []

    def eps(x: Tensor, t: Tensor) -> Tensor:
        k = len(seen)
        seen.append(x)
        assert torch.equal(x, q_sample(AC32, x0_known, int(t[0]), q_noises[k]))
        return gaussian_eps(LDM)(x, t)

    out = ddim(
        eps, torch.randn(2, 3, 8, 8), AC32, STEPS5, inpaint=Inpaint(x0_known, mask, q_noises)
    )
    assert len(seen) == 5
    assert torch.equal(paste_back(out, x0_known, mask), x0_known)


def test_inpaint_keep_nothing_is_plain_ddim_and_draws_in_official_order() -> None:
    shape = (2, 3, 8, 8)
    x_T, x0_known = torch.randn(shape, generator=gen(10)), torch.randn(shape, generator=gen(11))
    keep_none = Inpaint(x0_known, torch.zeros(2, 1, 8, 8))
    noises = torch.randn(5, *shape, generator=gen(12))
    plain = ddim(toy_eps, x_T, AC32, STEPS5, 1.0, noises=noises)
    assert torch.equal(
        ddim(toy_eps, x_T, AC32, STEPS5, 1.0, noises=noises, inpaint=keep_none), plain
    )
    # with a generator: per step the q-sample noise first (before the model), then the step noise
    g = gen(13)
    pairs = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(5)]
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    explicit = Inpaint(x0_known, half, torch.stack([q for q, _ in pairs]))
    expected = ddim(toy_eps, x_T, AC32, STEPS5, 1.0, noises=[n for _, n in pairs], inpaint=explicit)
    drawn = ddim(
        toy_eps, x_T, AC32, STEPS5, 1.0, generator=gen(13), inpaint=Inpaint(x0_known, half)
    )
    assert torch.equal(drawn, expected)
    pasted = paste_back(drawn, x0_known, half)
    assert torch.equal(pasted[..., :4], x0_known[..., :4])
    assert torch.equal(pasted[..., 4:], drawn[..., 4:])
