"""`ray.strategy: fsdp` full fine-tuning under Ray Train (gloo on CPU): the consolidated checkpoint
holds the whole transformer, a run stopped and resumed from it ends where DDP does."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from raydiff.config import ConfigError, parse_config, to_dict
from raydiff.launch.trainer import launch_training_task
from raydiff.registry import get_pipeline_class

pytestmark = pytest.mark.slow


def full_config(make_config, name, strategy, max_steps):
    return make_config(name, lora=None, train={"trainable_models": ["transformer"], "max_steps": max_steps,
                                               "batch_size": 2, "learning_rate": 1e-3},
                       ray={"num_workers": 2, "strategy": strategy})


def weights(result):
    return load_file(os.path.join(result.checkpoint.path, "trainable_weights.safetensors"))


def test_fsdp_checkpoints_are_whole_and_resume_to_the_ddp_result(ray_session, make_config, tiny_model, capfd):
    first = launch_training_task(full_config(make_config, "fsdp", "fsdp", max_steps=1))
    transformer = get_pipeline_class("flux").from_pretrained(tiny_model("flux"), components=["transformer"])
    expected = {f"transformer.{k}": tuple(v.shape) for k, v in transformer.pipe.transformer.state_dict().items()}
    assert {k: v.shape for k, v in weights(first).items()} == expected  # consolidated, not shards
    resumed = launch_training_task(full_config(make_config, "fsdp", "fsdp", max_steps=2))  # same name: resumes
    assert "resumed at step 1" in capfd.readouterr().out
    ddp = launch_training_task(full_config(make_config, "ddp", "ddp", max_steps=2))
    got, want = weights(resumed), weights(ddp)
    changed = [k for k in want if not np.array_equal(want[k], weights(first)[k])]
    assert changed  # the second step moved the weights
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_fsdp_is_refused_for_lora_and_validation(make_config):
    raw = to_dict(make_config())
    with pytest.raises(ConfigError, match="lora: null"):
        parse_config({**raw, "ray": {**raw["ray"], "strategy": "fsdp"}})
    full = to_dict(full_config(make_config, "x", "fsdp", 1))
    with pytest.raises(ConfigError, match="raydiff sample"):
        parse_config({**full, "validation": {"prompts": ["a red circle"]}})
