"""`ray.strategy: fsdp` full fine-tuning under Ray Train (gloo on CPU): every checkpoint holds the whole
transformer, and a run resumed from one ends where the uninterrupted run does. That FSDP's steps are the
one-process steps is tests/training/test_fsdp.py's check (2 gloo ranks without Ray)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from raydiff.config import ConfigError, parse_config, to_dict
from raydiff.launch.trainer import launch_training_task
from raydiff.registry import get_pipeline_class

pytestmark = pytest.mark.slow


def full_config(make_config, name, strategy, max_steps):
    return make_config(name, lora=None, train={"trainable_models": ["transformer"], "max_steps": max_steps,
                                               "save_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
                       ray={"num_workers": 2, "strategy": strategy, "num_to_keep": None})


def weights(checkpoint) -> dict:
    return load_file(os.path.join(checkpoint, "trainable_weights.safetensors"))


def test_fsdp_checkpoints_are_whole_and_a_resumed_run_ends_where_the_whole_run_does(ray_session, make_config,
                                                                                    tiny_model, capsys):
    whole = launch_training_task(full_config(make_config, "fsdp", "fsdp", max_steps=2))
    runs = Path(whole.checkpoint.path).parent.parent
    transformer = get_pipeline_class("flux").from_pretrained(tiny_model("flux"), components=["transformer"])
    expected = {f"transformer.{k}": tuple(v.shape) for k, v in transformer.pipe.transformer.state_dict().items()}
    first = weights(runs / "fsdp" / "checkpoint-000001")
    assert {k: v.shape for k, v in first.items()} == expected  # consolidated, not shards
    want = weights(whole.checkpoint.path)
    assert [k for k in want if not np.array_equal(want[k], first[k])]  # the second step moved the weights

    # A run that stopped after step 1: the whole run's checkpoint-000001 in its own run directory.
    shutil.copytree(runs / "fsdp" / "checkpoint-000001", runs / "resumed" / "checkpoint-000001")
    capsys.readouterr()
    resumed = launch_training_task(full_config(make_config, "resumed", "fsdp", max_steps=2))
    assert "continuing from checkpoint-000001 (step 1)" in capsys.readouterr().out
    got = weights(resumed.checkpoint.path)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_fsdp_is_refused_for_lora_and_validation(make_config):
    raw = to_dict(make_config())
    with pytest.raises(ConfigError, match="lora: null"):
        parse_config({**raw, "ray": {**raw["ray"], "strategy": "fsdp"}})
    full = to_dict(full_config(make_config, "x", "fsdp", 1))
    with pytest.raises(ConfigError, match="raydiff sample"):
        parse_config({**full, "validation": {"prompts": ["a red circle"]}})
