"""Flow-matching math against values worked out by hand (math/numpy here, never the implementation's output)."""

import math

import numpy as np
import pytest
import torch

from raydiff.diffusion.flow_matching import (
    DynamicShift,
    FlowSchedule,
    diffsynth_weight,
    exponential_shift,
    flow_target,
    loss_weight,
    noisy_latents,
    sample_sigmas,
    sample_u,
    sigma_quantiles,
    static_shift,
    stretch_to_terminal,
    weighted_mse,
)

# Family defaults as DiffSynth's FlowMatchScheduler sets them for training (design.md §1-2).
FLUX = FlowSchedule(shift=3.0, sigma_min=0.003 / 1.002, dynamic=DynamicShift(256, 4096, 0.5, 1.15))
WAN = FlowSchedule(shift=5.0)
QWEN = FlowSchedule(mu=0.8, shift_terminal=0.02, dynamic=DynamicShift(256, 8192, 0.5, 0.9))
SCHEDULES = {"flux": FLUX, "wan": WAN, "qwen": QWEN}
SAMPLINGS = ["diffsynth", "uniform", "logit_normal", "mode"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def np_diffsynth_grid(sigma_min, shift=None, mu=None, terminal=None):
    """DiffSynth's training grid, re-derived step by step in numpy."""
    sig = np.linspace(1, sigma_min, 1000) if sigma_min > 0 else np.linspace(1, 0, 1001)[:-1]
    sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1)) if mu is not None else shift * sig / (1 + (shift - 1) * sig)
    if terminal is not None:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return sig


# --- shifts -------------------------------------------------------------------------------------------------


def test_static_shift_hand_values():
    got = static_shift(torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64), 3.0)
    # 3*0.25/(1+2*0.25) = 0.75/1.5 = 0.5 ; 3*0.5/(1+2*0.5) = 1.5/2 = 0.75
    assert got.tolist() == pytest.approx([0.0, 0.5, 0.75, 1.0])


def test_exponential_shift_is_static_shift_with_e_mu():
    sig = np.linspace(0.001, 1, 37)
    for mu in (0.5, 0.8, 1.15):
        expected = math.exp(mu) / (math.exp(mu) + 1 / sig - 1)
        got = exponential_shift(torch.from_numpy(sig), mu).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        np.testing.assert_allclose(got, static_shift(torch.from_numpy(sig), math.exp(mu)).numpy(), rtol=1e-12)


def test_shifts_keep_zero_finite():
    zero = torch.zeros(3)
    assert exponential_shift(zero, 0.8).tolist() == [0.0, 0.0, 0.0]
    assert static_shift(zero, 5.0).tolist() == [0.0, 0.0, 0.0]
    # shift_terminal moves σ=0 a little below the terminal, but stays finite and in [0, 1].
    out = QWEN.shift_sigmas(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(out).all() and 0 <= out[0] < 0.02 and out[1] == 1.0


def test_stretch_to_terminal_hand_values():
    # 1-σ = [0.9, 0.5]; scale = 0.5/(1-0.1) = 5/9; σ' = 1 - (1-σ)*9/5 = [1-1.62, 0.1]
    got = stretch_to_terminal(torch.tensor([0.1, 0.5], dtype=torch.float64), 0.1)
    assert got.tolist() == pytest.approx([1 - 1.62, 0.1])


# --- grids --------------------------------------------------------------------------------------------------


def test_flux_grid_endpoints():
    g = FLUX.grid()
    a = 0.003 / 1.002
    assert g.shape == (1000,)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert g[-1].item() == pytest.approx(3 * a / (1 + 2 * a), rel=1e-12)
    assert (g[:-1] > g[1:]).all()


def test_wan_grid_endpoints():
    g = WAN.grid()
    assert g.shape == (1000,)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert g[-1].item() == pytest.approx(5 * 0.001 / (1 + 4 * 0.001), rel=1e-12)
    assert WAN.timesteps()[0].item() == pytest.approx(1000.0)


def test_qwen_grid_ends_at_terminal():
    g = QWEN.grid()
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert g[-1].item() == pytest.approx(0.02, abs=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_grid_matches_diffsynth_procedure(name):
    s = SCHEDULES[name]
    expected = np_diffsynth_grid(s.sigma_min, shift=s.shift, mu=s.mu, terminal=s.shift_terminal)
    np.testing.assert_allclose(s.grid().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_overrides():
    base = np.linspace(1, 0.003 / 1.002, 1000)
    np.testing.assert_allclose(FLUX.grid(shift=1.0).numpy(), base, rtol=1e-12)
    mu = 1.15
    np.testing.assert_allclose(FLUX.grid(mu=mu).numpy(), math.exp(mu) / (math.exp(mu) + 1 / base - 1), rtol=1e-10)
    # A user shift on an exponential family replaces the exponential form; the terminal stretch still applies.
    np.testing.assert_allclose(QWEN.grid(shift=2.0).numpy(), np_diffsynth_grid(0.0, shift=2.0, terminal=0.02),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        FLUX.grid(shift=3.0, mu=1.0)
    with pytest.raises(ValueError):
        FlowSchedule(shift=3.0, mu=1.0)


def test_dynamic_shift_flux_and_qwen():
    # 1024² image -> 128² latents -> 64² = 4096 tokens; 512² -> 32² = 1024 tokens.
    assert FLUX.dynamic.mu(4096) == pytest.approx(1.15)
    assert math.exp(FLUX.dynamic.mu(4096)) == pytest.approx(3.158, abs=1e-3)
    # 0.5 + (0.65/3840)*768 = 0.63
    assert FLUX.dynamic.mu(1024) == pytest.approx(0.63)
    assert math.exp(FLUX.dynamic.mu(1024)) == pytest.approx(1.88, abs=5e-3)
    assert QWEN.dynamic.mu(256) == pytest.approx(0.5)
    assert QWEN.dynamic.mu(8192) == pytest.approx(0.9)


# --- weights ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_diffsynth_weights_on_grid_average_one_min_zero(name):
    s = SCHEDULES[name]
    w = diffsynth_weight(s.grid().float(), s)
    assert w.dtype == torch.float32 and w.shape == (1000,)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w.min().item() == pytest.approx(0.0, abs=1e-5)
    # Same as DiffSynth's table: y = exp(-2((t-500)/1000)^2), y - min, * 1000 / sum.
    t = np_diffsynth_grid(s.sigma_min, shift=s.shift, mu=s.mu, terminal=s.shift_terminal) * 1000
    y = np.exp(-2 * ((t - 500) / 1000) ** 2)
    np.testing.assert_allclose(w.numpy(), (y - y.min()) * 1000 / (y - y.min()).sum(), rtol=1e-4, atol=1e-5)


def test_diffsynth_weight_off_grid():
    t = np_diffsynth_grid(0.0, shift=5.0) * 1000
    y = np.exp(-2 * ((t - 500) / 1000) ** 2)
    expected = (1.0 - math.exp(-0.5)) * 1000 / (y - y.min()).sum()  # σ=0.5 -> t=500 -> bell = 1
    got = loss_weight("diffsynth", torch.tensor([0.5]), WAN)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_simple_weights():
    s = torch.tensor([0.0, 0.5, 1.0])
    # cosmap: 2/(π(1 - 2σ + 2σ²)) -> σ=0.5: 2/(π·0.5); σ=0,1: 2/π
    assert loss_weight("cosmap", s, FLUX).tolist() == pytest.approx([2 / math.pi, 4 / math.pi, 2 / math.pi])
    sq = loss_weight("sigma_sqrt", s, FLUX)
    assert torch.isfinite(sq).all() and sq[1:].tolist() == pytest.approx([4.0, 1.0])
    assert loss_weight("none", s, FLUX).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        loss_weight("snr", s, FLUX)


# --- sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sampling_deterministic_per_seed(sampling):
    a = sample_sigmas(FLUX, sampling, 64, gen(0))
    b = sample_sigmas(FLUX, sampling, 64, gen(0))
    c = sample_sigmas(FLUX, sampling, 64, gen(1))
    assert a.dtype == torch.float32 and a.shape == (64,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a > 0) & (a <= 1)).all()


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_sample_u_range(density):
    u = sample_u(density, 20_000, gen(3))
    assert u.shape == (20_000,) and ((u > 0) & (u < 1)).all()
    assert torch.equal(u, sample_u(density, 20_000, gen(3)))


def test_sample_u_moments():
    assert sample_u("uniform", 100_000, gen(0)).mean().item() == pytest.approx(0.5, abs=0.01)
    z = torch.logit(sample_u("logit_normal", 100_000, gen(0), logit_mean=0.3, logit_std=0.7).double())
    assert z.mean().item() == pytest.approx(0.3, abs=0.01) and z.std().item() == pytest.approx(0.7, abs=0.01)
    # mode with s=0 is u' = 1-u: still uniform.
    assert sample_u("mode", 100_000, gen(0), mode_scale=0.0).mean().item() == pytest.approx(0.5, abs=0.01)


def test_diffsynth_sampling_draws_grid_values():
    s = sample_sigmas(WAN, "diffsynth", 500, gen(0))
    grid = WAN.grid().float()
    assert torch.isin(s, grid).all()
    assert len(torch.unique(s)) > 300  # ~uniform over 1000 indices: 500 draws hit ~400 distinct ones


def test_u_sampling_applies_shift():
    u = sample_u("uniform", 16, gen(7)).double().numpy()
    got = sample_sigmas(WAN, "uniform", 16, gen(7)).numpy()
    np.testing.assert_allclose(got, 5 * u / (1 + 4 * u), rtol=1e-6)
    mu = FLUX.dynamic.mu(4096)
    got = sample_sigmas(FLUX, "uniform", 16, gen(7), mu=mu).numpy()
    np.testing.assert_allclose(got, math.exp(mu) * u / (math.exp(mu) * u + 1 - u), rtol=1e-6)


# --- noising, target, loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_noisy_latents_and_target(shape):
    g = gen(0)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.equal(noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(noisy_latents(x0, noise, torch.ones(2)), noise)
    mixed = noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))  # σ is per sample
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], noise[1])
    sigma = torch.tensor([0.25, 0.7])
    xt = noisy_latents(x0, noise, sigma)
    torch.testing.assert_close(xt[1], 0.3 * x0[1] + 0.7 * noise[1])
    torch.testing.assert_close(x0 + sigma.view(-1, *[1] * (len(shape) - 1)) * flow_target(x0, noise), xt)
    assert torch.equal(flow_target(x0, noise), noise - x0)


def test_noisy_latents_keeps_dtype():
    x = torch.ones(2, 3, 4, 4, dtype=torch.bfloat16)
    assert noisy_latents(x, x, torch.tensor([0.1, 0.9])).dtype == torch.bfloat16


def test_weighted_mse_hand_values():
    pred = torch.zeros(3, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]]])
    # per-sample mse: 1, 4/4 = 1, (1+4+9+16)/4 = 7.5; weighted by (1, 2, 0.5): (1 + 2 + 3.75)/3 = 2.25
    loss = weighted_mse(pred, target, torch.tensor([1.0, 2.0, 0.5]))
    assert loss.shape == () and loss.item() == pytest.approx(2.25)
    bf = weighted_mse(pred.bfloat16(), target.bfloat16(), torch.ones(3, dtype=torch.bfloat16))
    assert bf.dtype == torch.float32 and bf.item() == pytest.approx((1 + 1 + 7.5) / 3)


# --- deterministic eval sigmas ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sigma_quantiles_sorted_in_range_deterministic(name, sampling):
    s = SCHEDULES[name]
    q = sigma_quantiles(s, sampling, 16)
    assert q.shape == (16,) and q.dtype == torch.float32
    assert (q[1:] >= q[:-1]).all() and ((q > 0) & (q <= 1)).all()
    assert torch.equal(q, sigma_quantiles(s, sampling, 16))


def test_sigma_quantiles_hand_values():
    # No shift, uniform: bin midpoints (i+0.5)/n.
    assert sigma_quantiles(FlowSchedule(), "uniform", 4).tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    # Logit-normal median is sigmoid(mean); with Wan's shift 5: 5m/(1+4m).
    m = 1 / (1 + math.exp(-0.4))
    assert sigma_quantiles(WAN, "logit_normal", 3, logit_mean=0.4)[1].item() == pytest.approx(5 * m / (1 + 4 * m))
    # diffsynth on Wan: ascending grid is 5k/(1000+4k) for k=1..1000; p=(i+0.5)/2 -> k = 251, 751.
    expected = [5 * k / (1000 + 4 * k) for k in (251, 751)]
    assert sigma_quantiles(WAN, "diffsynth", 2).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sampling", ["logit_normal", "mode"])
def test_sigma_quantiles_match_empirical(sampling):
    samples = sample_sigmas(FLUX, sampling, 400_000, gen(0)).double().numpy()
    p = (np.arange(10) + 0.5) / 10
    np.testing.assert_allclose(sigma_quantiles(FLUX, sampling, 10).numpy(), np.quantile(samples, p), atol=5e-3)


# --- one expert's share of the schedule (sigma_range) -------------------------------------------------------

HIGH, LOW = (0.875, math.inf), (0.0, 0.875)  # Wan 2.2 T2V-A14B: boundary_ratio 0.875


def test_diffsynth_range_keeps_the_grid_entries_an_expert_sees():
    # Wan grid entry i is 5u/(1+4u), u = 1 - i/1000; 5u/(1+4u) >= 0.875 <=> u >= 7/12 <=> i <= 416: 417 entries,
    # DiffSynth's Wan2.2-A14B scripts' timestep boundary 0.417 (high: ids [0, 417), low: [417, 1000)).
    high = sample_sigmas(WAN, "diffsynth", 20_000, gen(0), sigma_range=HIGH)
    low = sample_sigmas(WAN, "diffsynth", 20_000, gen(0), sigma_range=LOW)
    grid = WAN.grid().float()
    assert torch.isin(high, grid[:417]).all() and len(torch.unique(high)) == 417
    assert torch.isin(low, grid[417:]).all() and len(torch.unique(low)) == 583
    assert high.max().item() == 1.0 and low.max().item() < 0.875


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_continuous_range_is_the_law_conditioned_on_the_range(sampling):
    full = sample_sigmas(WAN, sampling, 400_000, gen(0)).double().numpy()
    p = (np.arange(10) + 0.5) / 10
    for lo, hi in (HIGH, LOW):
        part = sample_sigmas(WAN, sampling, 50_000, gen(1), sigma_range=(lo, hi)).double().numpy()
        assert (part >= lo).all() and (part < hi).all()
        kept = full[(full >= lo) & (full < hi)]  # rejection sampling from the unrestricted law, for comparison
        # Compared through the empirical CDF, whose error does not depend on the density at the quantile.
        quantiles = sigma_quantiles(WAN, sampling, 10, sigma_range=(lo, hi)).double().numpy()
        for draws in (part, kept):
            np.testing.assert_allclose((draws[:, None] < quantiles[None]).mean(0), p, atol=0.01)


def test_range_quantiles_hand_values():
    # Unshifted uniform restricted to [0.5, 1]: bin midpoints of [0.5, 1].
    got = sigma_quantiles(FlowSchedule(), "uniform", 2, sigma_range=(0.5, math.inf)).tolist()
    assert got == pytest.approx([0.625, 0.875], abs=1e-6)
    # Wan shift 5, uniform u below 7/12 (sigma < 0.875): the median u is 7/24.
    u = 7 / 24
    assert sigma_quantiles(WAN, "uniform", 1, sigma_range=LOW).item() == pytest.approx(5 * u / (1 + 4 * u), rel=1e-6)
    # diffsynth, high share: the 417 largest grid entries, ascending; p = 0.5 -> entry 208 of them.
    ascending = sorted(5 * (1 - i / 1000) / (1 + 4 * (1 - i / 1000)) for i in range(417))
    assert sigma_quantiles(WAN, "diffsynth", 1, sigma_range=HIGH).item() == pytest.approx(ascending[208], rel=1e-6)


def test_range_draws_are_deterministic_and_an_empty_range_fails():
    a = sample_sigmas(WAN, "logit_normal", 8, gen(3), sigma_range=LOW)
    assert torch.equal(a, sample_sigmas(WAN, "logit_normal", 8, gen(3), sigma_range=LOW))
    with pytest.raises(ValueError, match="no training timestep"):
        sample_sigmas(WAN, "diffsynth", 2, gen(0), sigma_range=(0.0, 1e-4))


def test_weighted_mse_mask_averages_over_counted_elements():
    pred = torch.zeros(2, 1, 3, 1, 1)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).view(2, 1, 3, 1, 1)
    mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)  # the first frame is left out
    # sample 0: (4 + 9) / 2 = 6.5; sample 1: (25 + 36) / 2 = 30.5; weights (1, 2): (6.5 + 61) / 2 = 33.75
    assert weighted_mse(pred, target, torch.tensor([1.0, 2.0]), mask).item() == pytest.approx(33.75)
    assert weighted_mse(pred, target, torch.ones(2), torch.ones(1, 1, 3, 1, 1)).item() == pytest.approx(
        weighted_mse(pred, target, torch.ones(2)).item())
