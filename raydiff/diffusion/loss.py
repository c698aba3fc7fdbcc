"""FlowMatchSFTLoss: DiffSynth's supervised flow-matching loss over a pipeline's `model_fn`."""

from __future__ import annotations

import torch

from raydiff.config import LossConfig
from raydiff.diffusion.flow_matching import flow_target, loss_weight, noisy_latents, per_sample_mse, sample_sigmas

# Inputs that are data or loss settings, not conditions of the denoiser (nor are `_` annotations such as
# `_regularization`). `loss_mask` (a unit's output, broadcastable to the latents) weights the elements:
# 0 for those the denoiser is given clean, a user's `mask` image on the latent grid.
_NOT_CONDITIONS = {"latents", "image", "video", "prompt", "mask", "loss_mask"}


def shift_kwargs(pipe, cfg: LossConfig, latents: torch.Tensor) -> dict:
    """The shift override for this batch: the resolution-dependent mu, the user's static shift, or none."""
    if cfg.dynamic_shift:
        if pipe.schedule.dynamic is None:
            raise ValueError(f"loss.dynamic_shift: the {pipe.family} family defines no resolution-dependent shift")
        return {"mu": pipe.schedule.dynamic.mu(pipe.image_seq_len(latents))}
    return {"shift": cfg.shift} if cfg.shift is not None else {}


def FlowMatchSFTLoss(pipe, inputs: dict, cfg: LossConfig, generator: torch.Generator,
                     reduce: bool = True) -> torch.Tensor:
    """Scalar loss for one batch (`reduce=False`: the (B,) per-sample losses it is the mean of). `inputs`
    holds `latents` x0 (B, C, ...) and the denoiser's conditions.

    Per sample: sigma from the configured density (within `pipe.sigma_range`, e.g. one expert's share),
    eps ~ N(0, 1), x_t = (1 - sigma) x0 + sigma eps, target eps - x0, fp32 MSE weighted by w(sigma) (over
    `loss_mask` when a unit gives one). Random numbers come from `generator` (CPU) so a step is reproducible
    from (seed, step, rank) whatever the device.
    """
    x0 = inputs["latents"]
    kw = shift_kwargs(pipe, cfg, x0)
    sigma = sample_sigmas(pipe.schedule, cfg.timestep_sampling, x0.shape[0], generator, logit_mean=cfg.logit_mean,
                          logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, sigma_range=pipe.sigma_range, **kw)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    weight = loss_weight(cfg.weighting, sigma, pipe.schedule, **kw)
    return flow_matching_loss(pipe, inputs, sigma, noise, weight=weight, reduce=reduce)


def flow_matching_loss(pipe, inputs: dict, sigma: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
    """The loss at given sigmas (B,) and noise (like latents): shared by training and the eval loss."""
    x0 = inputs["latents"].float()
    sigma = sigma.to(x0.device)
    conditions = {k: v for k, v in inputs.items() if k not in _NOT_CONDITIONS and not k.startswith("_")}
    pred = pipe.model_fn(noisy_latents(x0, noise, sigma), sigma, **conditions)
    weight = torch.ones_like(sigma) if weight is None else weight.to(x0.device)
    per_sample = per_sample_mse(pred, flow_target(x0, noise), inputs.get("loss_mask")) * weight.float()
    return per_sample.mean() if reduce else per_sample
