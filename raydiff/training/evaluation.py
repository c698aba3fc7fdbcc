"""A deterministic eval loss: fixed σ grid, fixed noise per (sample, σ), so it depends on the weights alone.

The σ are the ``n`` quantiles of the training σ law (``sigma_quantiles``); the noise for the sample with
global index ``idx`` at the j-th σ comes from a generator seeded by ``(seed, idx, j)``. Nothing depends on
batch composition, batch size, rank or world size, so sharded evaluation over any number of workers gives
the same mean (up to float summation order) as long as each sample is counted once. The loss is unweighted:
the training weighting is an optimisation choice and must not change what a Tune search compares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from raydiff.config import RaydiffConfig
from raydiff.data.collate import collate
from raydiff.diffusion.flow_matching import sigma_quantiles
from raydiff.diffusion.loss import flow_matching_loss, shift_kwargs


@dataclass(frozen=True)
class EvalSettings:
    """Mirrors the ``eval:`` config section."""

    num_sigmas: int = 8
    seed: int = 1234


def noise_seed(seed: int, sample_id: int, j: int) -> int:
    """64-bit generator seed for (seed, sample, σ index); a hash, so nearby ids give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def fixed_noise(shape: Sequence[int], seed: int, sample_id: int, j: int) -> torch.Tensor:
    """float32 CPU ε ~ N(0, 1) of ``shape`` (one sample's latents), the same on every machine and rank."""
    g = torch.Generator().manual_seed(noise_seed(seed, sample_id, j))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def eval_sigmas(pipe, loss_cfg, n: int, latents: torch.Tensor) -> torch.Tensor:
    """(n,) float32 ascending σ: quantiles of the configured training σ law at these latents' resolution."""
    return sigma_quantiles(pipe.schedule, loss_cfg.timestep_sampling, n, logit_mean=loss_cfg.logit_mean,
                           logit_std=loss_cfg.logit_std, mode_scale=loss_cfg.mode_scale,
                           sigma_range=pipe.sigma_range, **shift_kwargs(pipe, loss_cfg, latents))


@torch.no_grad()
def eval_loss_sums(module, batch: dict, sample_ids: Sequence[int], settings: EvalSettings,
                   loss_cfg) -> tuple[float, int]:
    """(sum of per-(sample, σ) unweighted flow-matching MSEs, number of terms) for one batch.

    ``module`` is a ``DiffusionTrainingModule`` (unwrapped, not DDP); ``sample_ids`` (B,) are the samples'
    global indices in the eval set. The units run once per batch, then one denoiser forward per σ.
    """
    # Remember every submodule's flag: a training module keeps its frozen models in eval mode,
    # which a blanket `module.train()` afterwards would undo.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        pipe = module.pipe
        inputs = module.run_units(batch)
        x0 = inputs["latents"]
        b = x0.shape[0]
        assert len(sample_ids) == b, f"{len(sample_ids)} sample ids for a batch of {b}"
        sigmas = eval_sigmas(pipe, loss_cfg, settings.num_sigmas, x0)
        means = []
        for j, s in enumerate(sigmas.tolist()):
            noise = torch.stack([fixed_noise(x0.shape[1:], settings.seed, int(i), j) for i in sample_ids])
            sigma = torch.full((b,), s, dtype=torch.float32)
            means.append(flow_matching_loss(pipe, inputs, sigma, noise.to(x0.device)))
        # One device sync per batch; the (B,)-mean times B is the per-sample sum.
        total = torch.stack(means).double().sum().item() * b
        return total, b * len(sigmas)
    finally:
        for m, training in modes:
            m.training = training


def reduce_eval(total: float, count: int, world: int, device) -> float:
    """Mean over all ranks: all-reduce (sum, count) when ``world > 1``; every rank gets the same value."""
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    if count == 0:
        raise ValueError("eval loss over no samples: the eval set (or every shard of it) is empty")
    return total / count


def evaluate(module, batches: Iterable[tuple[dict, list[int]]], settings: EvalSettings, loss_cfg,
             world: int = 1, device="cpu") -> float:
    """Eval loss over ``(batch, sample_ids)`` pairs (this rank's shard), reduced across ``world`` ranks."""
    total, count = 0.0, 0
    for batch, ids in batches:
        t, c = eval_loss_sums(module, batch, ids, settings, loss_cfg)
        total, count = total + t, count + c
    return reduce_eval(total, count, world, device)


class EvalSet:
    """This rank's share of the eval set (positions p with p % world == rank), decoded (in stream/cache
    mode also encoded) once and kept on the host; `loss` is the deterministic eval loss reduced across
    ranks. Batches hold samples of one size (eval sets of mixed sizes need no buckets)."""

    def __init__(self, rows: Iterable[dict], cfg: RaydiffConfig, device, rank: int, world: int):
        self.cfg, self.device, self.world = cfg, device, world
        mine = [row for p, row in enumerate(rows) if p % world == rank]
        size, sized = cfg.eval.batch_size, {}
        for row in mine:
            sized.setdefault(np.shape(row.get(cfg.data.data_file_keys[0], row.get("latents"))), []).append(row)
        self.batches = [rows[i:i + size] for rows in sized.values() for i in range(0, len(rows), size)]
        self.settings = EvalSettings(num_sigmas=cfg.eval.num_sigmas, seed=cfg.eval.seed)

    @classmethod
    def for_rank(cls, samples: ray.ObjectRef, cfg: RaydiffConfig, device, rank: int, world: int,
                 whole: bool = False) -> EvalSet:
        """From the eval samples the driver started (raydiff.data.eval_set.start_eval_set). `whole`: every
        rank scores all of them (FSDP, whose forwards are collective)."""
        rows = ray.get(samples)
        return cls(rows, cfg, device, *((0, 1) if whole else (rank, world)))

    def loss(self, module) -> float:
        keys = self.cfg.data.data_file_keys

        def batches():
            for rows in self.batches:
                columns = {k: [r[k] for r in rows] for k in rows[0]}
                columns.update({k: np.stack(columns[k]) for k in keys if k in columns})
                yield collate(columns, self.device, keys), [int(r["_row"]) for r in rows]

        return evaluate(module, batches(), self.settings, self.cfg.loss, self.world, self.device)
