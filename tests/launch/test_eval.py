"""The eval loss through raydiff's loop: held-out rows, reported at every `eval.every_steps` and with the final
checkpoint, a function of the weights alone. That it does not depend on the world size (held-out rows sharded
across ranks, each counted once) is checked on the 2-worker run of tests/launch/test_preprocess_modes.py."""

import json
from pathlib import Path

import pytest
import torch

from raydiff.launch.trainer import launch_training_task
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

pytestmark = pytest.mark.slow


def test_eval_loss_is_reported_and_depends_on_the_weights_alone(ray_session, make_config, tmp_path):
    # A fixed, non-trivial LoRA and a learning rate too small to move it: both evals score the same weights.
    module = PipelineTrainingModule(make_config())
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    save_lora(str(tmp_path / "init"), module.trainable_state_dict(), module.lora_config)

    cfg = make_config("eval", lora={"rank": 4, "init_from": str(tmp_path / "init")},
                      train={"learning_rate": 1e-12, "max_steps": 2, "save_steps": 2},
                      eval={"holdout": 5, "every_steps": 1, "num_sigmas": 4},
                      ray={"num_workers": 0})  # local mode
    result = launch_training_task(cfg)
    state = json.loads(Path(result.checkpoint.path, "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert len(evals) == 2 and result.metrics["eval_loss"] == evals[-1]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)  # lr 1e-12: the weights did not move
