"""Flow-matching training math: timestep shifts, sigma sampling, noising, targets and loss weights.

Pure tensor functions (no Ray, no config): randomness only through an explicit ``torch.Generator``.
Conventions (docs/flow_matching.md): ``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``, σ ∈ [0, 1], timestep ``t = 1000·σ``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
SAMPLINGS = ("diffsynth", "uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "diffsynth", "cosmap", "sigma_sqrt")


def static_shift(sigma: Tensor, s: float) -> Tensor:
    """SD3/FLUX/Wan shift ``σ' = sσ / (1 + (s-1)σ)``; fixes 0 and 1. Any shape."""
    return s * sigma / (1 + (s - 1) * sigma)


def exponential_shift(sigma: Tensor, mu: float) -> Tensor:
    """Qwen-Image/FLUX-dynamic shift ``σ' = e^μ / (e^μ + 1/σ - 1)``, i.e. static shift with ``s = e^μ``.

    Written as ``e^μ·σ / (e^μ·σ + 1 - σ)`` so σ = 0 gives 0 instead of going through 1/0. Any shape.
    """
    e = math.exp(mu)
    return e * sigma / (e * sigma + 1 - sigma)


def stretch_to_terminal(sigma: Tensor, terminal: float, *, last: float | None = None) -> Tensor:
    """diffusers' ``stretch_shift_to_terminal``: affine map of ``1-σ`` that keeps 1 and sends ``last`` to ``terminal``.

    ``last`` defaults to ``sigma[-1]`` (a descending grid). Pass it explicitly to stretch values that are not
    a grid (sampled σ), so they get the same map as the grid. Any shape.
    """
    last = float(sigma.reshape(-1)[-1]) if last is None else last
    scale = (1 - last) / (1 - terminal)
    return 1 - (1 - sigma) / scale


@dataclass(frozen=True)
class DynamicShift:
    """Resolution-dependent shift: ``μ = base_shift + m·(L - base_seq)``, ``m = Δshift/Δseq``, ``s = e^μ``.

    ``L`` is the number of image tokens, ``(H_lat/2)·(W_lat/2)``; extrapolates linearly outside the range.
    """

    base_seq: int
    max_seq: int
    base_shift: float
    max_shift: float

    def mu(self, seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_seq - self.base_seq)
        return self.base_shift + m * (seq_len - self.base_seq)


@dataclass(frozen=True)
class FlowSchedule:
    """A family's training timestep defaults (DiffSynth's ``FlowMatchScheduler`` in training mode).

    ``shift`` (static) and ``mu`` (exponential) are exclusive; ``shift_terminal`` applies after either.
    ``sigma_min > 0`` gives the grid ``linspace(1, sigma_min, 1000)`` (FLUX); ``0`` gives
    ``linspace(1, 0, 1001)[:-1]`` (Wan, Qwen-Image), so σ = 0 is never on the grid.
    """

    shift: float | None = None
    mu: float | None = None
    shift_terminal: float | None = None
    sigma_min: float = 0.0
    dynamic: DynamicShift | None = None

    def __post_init__(self):
        if self.shift is not None and self.mu is not None:
            raise ValueError("FlowSchedule takes a static `shift` or an exponential `mu`, not both")

    def base_grid(self) -> Tensor:
        """(1000,) float64 unshifted σ, descending from 1."""
        n = NUM_TRAIN_TIMESTEPS
        if self.sigma_min > 0:
            return torch.linspace(1.0, self.sigma_min, n, dtype=torch.float64)
        return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]

    def _shift(self, sigma: Tensor, shift: float | None, mu: float | None) -> Tensor:
        # Caller overrides win over family defaults; an override `mu` comes from a dynamic shift.
        if shift is not None and mu is not None:
            raise ValueError("pass `shift` or `mu`, not both")
        if mu is not None or (shift is None and self.mu is not None):
            return exponential_shift(sigma, self.mu if mu is None else mu)
        if shift is not None or self.shift is not None:
            return static_shift(sigma, self.shift if shift is None else shift)
        return sigma

    def shift_sigmas(self, sigma: Tensor, *, shift: float | None = None, mu: float | None = None) -> Tensor:
        """Apply the family's shift (or the ``shift``/``mu`` override), then ``shift_terminal``. Any shape.

        σ = 0 maps to 0 under the shifts; with ``shift_terminal`` the stretch is anchored at the grid's last
        shifted σ (so ``grid()`` matches DiffSynth exactly), and σ below that lands a little under the terminal.
        """
        out = self._shift(sigma, shift, mu)
        if self.shift_terminal is None:
            return out
        last = float(self._shift(self.base_grid()[-1:], shift, mu))
        return stretch_to_terminal(out, self.shift_terminal, last=last)

    def grid(self, *, shift: float | None = None, mu: float | None = None) -> Tensor:
        """(1000,) float64 descending shifted σ: the training grid."""
        return self.shift_sigmas(self.base_grid(), shift=shift, mu=mu)

    def timesteps(self, **kw) -> Tensor:
        """(1000,) float64 descending timesteps, ``grid(**kw) * 1000``."""
        return self.grid(**kw) * NUM_TRAIN_TIMESTEPS


def sample_u(density: str, batch: int, generator: torch.Generator, *, logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """(B,) float32 u ∈ [0, 1] on the generator's device (endpoints only with probability ~2^-24).

    Same draws as diffusers' ``compute_density_for_timestep_sampling`` for the same generator state.
    """
    kw = dict(size=(batch,), generator=generator, device=generator.device)
    if density == "uniform":
        return torch.rand(**kw)
    if density == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, **kw))
    if density == "mode":
        u = torch.rand(**kw)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown density {density!r}; expected one of {SAMPLINGS[1:]}")


def sample_sigmas(schedule: FlowSchedule, sampling: str, batch: int, generator: torch.Generator, *,
                  shift: float | None = None, mu: float | None = None, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29,
                  sigma_range: tuple[float, float] | None = None) -> Tensor:
    """(B,) float32 training σ on the generator's device, one per sample.

    ``"diffsynth"``: uniform index into the shifted 1000-entry grid (DiffSynth's default);
    otherwise ``u ~ sample_u(sampling)`` shifted continuously with ``schedule.shift_sigmas``.
    ``sigma_range=(lo, hi)``: the same law restricted to ``lo <= σ < hi`` (``hi > 1`` keeps σ = 1), e.g. one
    expert's share of a two-expert schedule: grid entries in range, or the continuous law's inverse CDF
    between the range's probabilities (draws then differ from the unrestricted ones).
    """
    density = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    if sampling == "diffsynth":
        grid = _grid_in_range(schedule, sigma_range, shift=shift, mu=mu)
        idx = torch.randint(0, len(grid), (batch,), generator=generator, device=generator.device)
        return grid.to(idx.device)[idx].float()
    if sigma_range is not None:
        p_lo, p_hi = _probability_range(schedule, sampling, tuple(sigma_range), shift, mu, **density)
        p = p_lo + (p_hi - p_lo) * torch.rand((batch,), generator=generator, device=generator.device).double()
        return sigma_quantile(schedule, sampling, p, shift=shift, mu=mu, **density).float()
    u = sample_u(sampling, batch, generator, **density)
    return schedule.shift_sigmas(u.double(), shift=shift, mu=mu).float()


def _grid_in_range(schedule: FlowSchedule, sigma_range: tuple[float, float] | None, **shift_kw) -> Tensor:
    """The shifted grid (descending, float64), only the entries with lo <= σ < hi when a range is given."""
    grid = schedule.grid(**shift_kw)
    if sigma_range is None:
        return grid
    lo, hi = sigma_range
    kept = grid[(grid >= lo) & ((grid < hi) | (hi > 1))]
    if len(kept) == 0:
        raise ValueError(f"no training timestep has sigma in [{lo}, {hi})")
    return kept


def sigma_quantile(schedule: FlowSchedule, sampling: str, p: Tensor, *, shift: float | None = None,
                   mu: float | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> Tensor:
    """σ at cumulative probabilities ``p`` ∈ [0, 1] (any shape) of a continuous training σ law: its inverse CDF.

    u-densities are inverted analytically; every shift is increasing in u, so σ quantiles are shifted u quantiles.
    """
    p = p.double()
    if sampling == "uniform":
        u = p
    elif sampling == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(p))
    elif sampling == "mode":
        # The mode map is decreasing in the uniform draw for -1 < s < 1/(π/2 - 1) ≈ 1.75, so quantile p is f(1-p).
        if not -1 < mode_scale < 1 / (math.pi / 2 - 1):
            raise ValueError(f"mode_scale {mode_scale} makes the mode density non-monotone")
        v = 1 - p
        u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    else:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    return schedule.shift_sigmas(u, shift=shift, mu=mu)


@functools.lru_cache(maxsize=64)
def _probability_range(schedule: FlowSchedule, sampling: str, sigma_range: tuple[float, float],
                       shift: float | None, mu: float | None, **density) -> tuple[float, float]:
    """(P(σ < lo), P(σ < hi)) under a continuous law, by bisection on its (increasing) quantile function.
    Cached: a run asks for the same range every step."""

    def cdf(value: float) -> float:
        if value > 1:
            return 1.0
        a, b = 0.0, 1.0
        for _ in range(60):  # 2^-60: far below float32 σ resolution
            mid = (a + b) / 2
            q = float(sigma_quantile(schedule, sampling, torch.tensor(mid), shift=shift, mu=mu, **density))
            a, b = (mid, b) if q < value else (a, mid)
        return b

    lo, hi = (cdf(v) for v in sigma_range)
    if hi <= lo:
        raise ValueError(f"the {sampling} sigma law puts no probability on [{sigma_range[0]}, {sigma_range[1]})")
    return lo, hi


def diffsynth_weight(sigma: Tensor, schedule: FlowSchedule, *, shift: float | None = None,
                     mu: float | None = None) -> Tensor:
    """(B,) float32 DiffSynth weight: ``exp(-2((t-500)/1000)²)``, minus its min over the grid, mean 1 on the grid.

    Evaluated at ``t = 1000σ`` by formula, so σ off the grid work too. Every grid starts at σ = 1, so the
    min is ``e^-0.5`` and the weight is ≥ 0 for all σ ∈ [0, 1].
    """
    n = NUM_TRAIN_TIMESTEPS

    def bell(t: Tensor) -> Tensor:
        return torch.exp(-2 * ((t - n / 2) / n) ** 2)

    y = bell(schedule.timesteps(shift=shift, mu=mu))  # float64 on CPU: two Python floats, no device sync
    y_min, total = float(y.min()), float((y - y.min()).sum())
    return (bell(sigma.float() * n) - y_min) * (n / total)


def loss_weight(weighting: str, sigma: Tensor, schedule: FlowSchedule, **shift_kw) -> Tensor:
    """(B,) float32 per-sample loss weight for σ (B,); ``shift_kw`` (shift=, mu=) only matter for diffsynth."""
    if weighting == "none":
        return torch.ones_like(sigma, dtype=torch.float32)
    if weighting == "diffsynth":
        return diffsynth_weight(sigma, schedule, **shift_kw)
    s = sigma.float()
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    if weighting == "sigma_sqrt":
        # σ^-2 is infinite at σ = 0 (reachable by uniform sampling); 1e-4 caps the weight at 1e8.
        return s.clamp(min=1e-4) ** -2
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching ``like``'s ndim and dtype, for broadcasting over images or videos."""
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = (1-σ)·x0 + σ·ε``. x0, noise: (B, ...) any ndim; sigma: (B,). Returns x0's shape and dtype."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target ``ε - x0`` = d x_t / dσ. (B, ...)."""
    return noise - x0


def per_sample_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B,) fp32 MSE, the mean over each sample's non-batch dims.

    ``mask`` (broadcastable to pred, weights in [0, 1]): a weighted mean, sum(mask · err²) / sum(mask), over
    the elements the mask counts, e.g. without a first frame the denoiser is given clean (Wan 2.2 TI2V
    image-to-video), or a user's `mask` image. Normalised by the mask's area, not the sample's, so a sample's
    loss keeps the scale of an unmasked one however small its mask (docs/flow_matching.md); an all-zero
    mask gives 0. Upcast before subtracting: bf16 differences of nearby values lose most of their bits.
    """
    squared = (pred.float() - target.float()).pow(2)
    if mask is None:
        return squared.flatten(1).mean(1)
    mask = mask.to(squared.device, squared.dtype).expand_as(squared)
    return (squared * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(torch.finfo(torch.float32).tiny)


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scalar fp32 loss: `per_sample_mse` × weight (B,), mean over the batch."""
    return (per_sample_mse(pred, target, mask) * weight.float()).mean()


def sigma_quantiles(schedule: FlowSchedule, sampling: str, n: int, *, shift: float | None = None,
                    mu: float | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                    mode_scale: float = 1.29, sigma_range: tuple[float, float] | None = None) -> Tensor:
    """(n,) float32 ascending σ at the midpoints ``(i+0.5)/n`` of n equal-probability bins of the training σ law
    (restricted to ``sigma_range`` as ``sample_sigmas`` restricts it).

    No randomness, so an eval loss over these σ (with fixed noise) is comparable across runs and trials.
    """
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if sampling == "diffsynth":
        grid = _grid_in_range(schedule, sigma_range, shift=shift, mu=mu).sort().values
        return grid[(p * len(grid)).long().clamp(max=len(grid) - 1)].float()
    density = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    if sigma_range is not None:
        p_lo, p_hi = _probability_range(schedule, sampling, tuple(sigma_range), shift, mu, **density)
        p = p_lo + (p_hi - p_lo) * p
    return sigma_quantile(schedule, sampling, p, shift=shift, mu=mu, **density).float()
