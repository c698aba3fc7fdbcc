"""FSDP2 full fine-tuning of the Z-Image, FLUX.2 [klein] and Wan DiTs on 2 gloo ranks (no Ray): every repeated
block becomes its own FSDP unit, and one sharded step gives the single-process weights and gradient norm.
The FLUX.1 case, with gathering, resume and clipping, is tests/training/test_fsdp.py; this reuses its step.
The ranks run in the session's one FSDP spawn (tests/training/conftest.py); the tests read what rank 0 wrote."""

from __future__ import annotations

import pytest
import torch
from fsdp_ranks import MAX_SEQUENCE_LENGTH, assert_same, family_config, train_step
from safetensors.torch import load_file

from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

pytestmark = pytest.mark.slow  # two spawned ranks load the models: minutes on 2 cores


@pytest.mark.parametrize("family", sorted(MAX_SEQUENCE_LENGTH))
def test_sharded_full_fine_tuning_matches_one_process(family, fsdp_run, tiny_model):
    cfg = family_config(family, tiny_model(family))
    module = PipelineTrainingModule(cfg)
    params = module.trainable_parameters()
    norm = train_step(module, build_optimizer(cfg, params, total_steps=2)[0], params, 0)
    assert_same(load_file(f"{fsdp_run}/{family}_step1.safetensors"), module.trainable_state_dict())
    torch.testing.assert_close(torch.load(f"{fsdp_run}/{family}_norm.pt"), torch.tensor([norm]), rtol=1e-5, atol=0)
