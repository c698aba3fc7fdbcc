"""The deterministic eval loss: fixed σ grid and noise, independent of batching and sharding, no Ray."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydiff.diffusion.flow_matching import sigma_quantiles
from raydiff.diffusion.loss import shift_kwargs
from raydiff.training.evaluation import EvalSettings, eval_loss_sums, evaluate, fixed_noise, reduce_eval
from raydiff.training.module import PipelineTrainingModule

SETTINGS = EvalSettings(num_sigmas=4, seed=7)
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


@pytest.fixture
def module(make_config):
    return PipelineTrainingModule(make_config())


def data(ids):
    """Samples are a pure function of their id, so any batching sees the same sample."""
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) * 2 - 1 for i in ids]
    return {"image": torch.stack(images), "prompt": [PROMPTS[i] for i in ids]}


def mean_of(module, shards, loss_cfg=None):
    loss_cfg = loss_cfg or module.loss_config
    total, count = 0.0, 0
    for ids in shards:
        t, c = eval_loss_sums(module, data(ids), ids, SETTINGS, loss_cfg)
        total, count = total + t, count + c
    return total / count


def randomize_lora_b(module):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_eval_loss_is_exactly_repeatable_and_consumes_no_rng(module):
    flags = [m.training for m in module.modules()]
    assert any(flags) and not all(flags)  # LoRA'd transformer trains, frozen encoders do not
    rng = torch.get_rng_state()
    a = mean_of(module, [[0, 1]])
    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    b = mean_of(module, [[0, 1]])
    with torch.no_grad():
        module(data([2, 3]), generator=torch.Generator().manual_seed(99))
    c = mean_of(module, [[0, 1]])
    assert a == b == c and a > 0


def test_batching_and_sharding_do_not_change_the_loss(module):
    randomize_lora_b(module)  # a non-trivial model, so agreement is not an accident of zeros
    cfg = module.loss_config
    one_batch = mean_of(module, [[0, 1, 2, 3]])
    singles = evaluate(module, [(data([i]), [i]) for i in range(4)], SETTINGS, cfg)
    rank0 = eval_loss_sums(module, data([0, 2]), [0, 2], SETTINGS, cfg)
    rank1 = eval_loss_sums(module, data([3, 1]), [3, 1], SETTINGS, cfg)
    two_ranks = (rank0[0] + rank1[0]) / (rank0[1] + rank1[1])
    assert rank0[1] == rank1[1] == 2 * SETTINGS.num_sigmas
    assert one_batch == pytest.approx(singles, abs=1e-6, rel=0)
    assert one_batch == pytest.approx(two_ranks, abs=1e-6, rel=0)


def test_noise_depends_on_seed_sample_and_sigma_index():
    base = fixed_noise((4, 8, 8), 7, 0, 0)
    assert torch.equal(base, fixed_noise((4, 8, 8), 7, 0, 0))
    for other in [(8, 0, 0), (7, 1, 0), (7, 0, 1)]:
        assert not torch.equal(base, fixed_noise((4, 8, 8), *other))


def test_untrained_lora_gives_the_base_models_loss(module):
    lora = mean_of(module, [[0, 1]])
    module.pipe.pipe.transformer.disable_adapters()
    base = mean_of(module, [[0, 1]])
    module.pipe.pipe.transformer.enable_adapters()
    assert lora == base
    randomize_lora_b(module)
    assert mean_of(module, [[0, 1]]) != base


def test_training_weighting_does_not_change_the_eval_loss(module):
    cfg = module.loss_config
    assert cfg.weighting != "none"
    assert mean_of(module, [[0]], cfg) == mean_of(module, [[0]], cfg.model_copy(update={"weighting": "none"}))


@pytest.mark.parametrize("loss", [
    {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 0.8, "shift": 2.0},
    {"timestep_sampling": "diffsynth", "dynamic_shift": True},
    {"timestep_sampling": "mode", "mode_scale": 0.5},
])
def test_sigmas_are_the_quantiles_of_the_training_law(make_config, loss):
    module = PipelineTrainingModule(make_config(loss=loss))
    cfg, pipe = module.loss_config, module.pipe
    seen, shapes, model_fn = [], set(), pipe.model_fn

    def recording(latents, sigma, **kw):
        seen.append(sigma.clone())
        shapes.add(tuple(latents.shape))
        return model_fn(latents, sigma, **kw)

    pipe.model_fn = recording
    calls = []
    pipe.units = [dataclasses.replace(u, fn=lambda p, i, fn=u.fn, name=u.name: calls.append(name) or fn(p, i))
                  for u in pipe.units]
    eval_loss_sums(module, data([0, 1]), [0, 1], SETTINGS, cfg)

    (shape,) = shapes
    latents = torch.zeros(shape)
    expected = sigma_quantiles(pipe.schedule, cfg.timestep_sampling, SETTINGS.num_sigmas, logit_mean=cfg.logit_mean,
                               logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, **shift_kwargs(pipe, cfg, latents))
    assert torch.equal(torch.stack([s[0] for s in seen]), expected)
    assert all(torch.equal(s, s[:1].expand(2)) for s in seen)  # one σ per forward, shared by the batch
    assert sorted(calls) == sorted(u.name for u in pipe.units)  # units once per batch, not once per σ


def _reduce_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        value = reduce_eval(total=[3.0, 5.0][rank], count=[1, 3][rank], world=world, device="cpu")
        torch.save(value, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_eval_all_reduces_sums_and_counts(tmp_path):
    assert reduce_eval(6.0, 4, world=1, device="cpu") == 1.5
    with pytest.raises(ValueError, match="no samples"):
        reduce_eval(0.0, 0, world=1, device="cpu")
    # fork, not spawn: a spawned child re-imports torch and raydiff (tens of seconds on a small box).
    mp.start_processes(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [2.0, 2.0]
