"""FSDP2 full fine-tuning on 2 gloo ranks (no Ray): sharded training matches one process, the gathered
weights are whole and load into a plain model, a resumed run matches an uninterrupted one, and the EMA
(train.ema) averages each rank's shards and gathers to the one-process EMA.

The ranks run in the session's one FSDP spawn (tests/training/conftest.py, tests/training/fsdp_ranks.py) and
write their results to files that the tests below read.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_ranks import EMA_CONFIG, MAX_NORM, assert_same, flux_config, train_step
from safetensors.torch import load_file, save_file

from raydiff.training.ema import EMA
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer


@pytest.fixture(scope="module")
def cfg(tiny_model, shapes):
    return flux_config(tiny_model("flux"), shapes)


@pytest.fixture(scope="module")
def reference(cfg):
    """The same two steps in one process, without FSDP: (weights after step 2, the two grad norms, the EMA
    after step 2 in the weights' format)."""
    module = PipelineTrainingModule(cfg)
    params = module.trainable_parameters()
    optimizer = build_optimizer(cfg, params, total_steps=2)[0]
    ema = EMA(params, EMA_CONFIG)
    norms = []
    for step in range(2):
        norms.append(train_step(module, optimizer, params, step))
        ema.update(step + 1)
    return module.trainable_state_dict(), norms, ema.weights(module.trainable_state_dict)


def test_sharded_training_matches_one_process(fsdp_run, reference):
    weights, norms, _ = reference
    assert_same(load_file(f"{fsdp_run}/step2.safetensors"), weights)
    # clip_grad_norm_ over DTensor shards reduces across ranks: the norm of the whole gradient.
    torch.testing.assert_close(torch.load(f"{fsdp_run}/norms.pt"), torch.tensor(norms), rtol=1e-5, atol=0)
    assert min(norms) > MAX_NORM  # so clipping was active in both steps, and checked


def test_gathered_weights_are_whole_and_load_into_a_plain_model(fsdp_run, cfg, tmp_path):
    weights = load_file(f"{fsdp_run}/step2.safetensors")
    plain = PipelineTrainingModule(cfg)
    transformer = plain.models["transformer"]
    assert {k: v.shape for k, v in weights.items()} == {f"transformer.{k}": v.shape
                                                          for k, v in transformer.state_dict().items()}
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in weights.values())
    save_file(weights, str(tmp_path / "w.safetensors"))
    own = {k.removeprefix("transformer."): v for k, v in load_file(str(tmp_path / "w.safetensors")).items()}
    transformer.load_state_dict(own, strict=True)
    assert_same(plain.trainable_state_dict(), weights)


def test_resume_from_full_state_matches_uninterrupted_run(fsdp_run):
    optim = torch.load(f"{fsdp_run}/step1_optim.pt", weights_only=True)
    assert optim["state"] and all(s["step"] == 1 for s in optim["state"].values())
    assert_same(load_file(f"{fsdp_run}/resumed.safetensors"), load_file(f"{fsdp_run}/step2.safetensors"))


def test_ema_is_sharded_like_the_weights_and_gathers_to_the_one_process_ema(fsdp_run, reference):
    weights, _, ema = reference
    gathered = load_file(f"{fsdp_run}/ema.safetensors")
    assert_same(gathered, ema)
    assert any(not torch.equal(gathered[k], weights[k]) for k in weights)  # an average, not the weights
