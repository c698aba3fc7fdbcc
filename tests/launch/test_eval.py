"""The eval loss through Ray: held-out rows, sharded across ranks, the same value for 1 and 2 workers."""

import json
from pathlib import Path

import pytest
import torch

from raydiff.launch.trainer import launch_training_task
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

pytestmark = pytest.mark.slow


def test_eval_loss_is_reported_and_independent_of_world_size(ray_session, make_config, tmp_path):
    # A fixed, non-trivial LoRA and a learning rate too small to move it: both runs evaluate the same weights.
    module = PipelineTrainingModule(make_config())
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    save_lora(str(tmp_path / "init"), module.trainable_state_dict(), module.lora_config)

    losses = {}
    for workers in (0, 2):  # 0: local mode, one rank in this process
        cfg = make_config(f"eval-{workers}", lora={"rank": 4, "init_from": str(tmp_path / "init")},
                          train={"learning_rate": 1e-12, "max_steps": 2, "save_steps": 2},
                          eval={"holdout": 5, "every_steps": 1, "num_sigmas": 4},
                          ray={"num_workers": workers})
        result = launch_training_task(cfg)
        state = json.loads(Path(result.checkpoint.path, "trainer_state.json").read_text())
        evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
        assert len(evals) == 2 and result.metrics["eval_loss"] == evals[-1]
        assert evals[0] == pytest.approx(evals[1], rel=1e-6)  # lr 1e-12: the weights did not move
        losses[workers] = evals[-1]
    # 5 held-out samples: rank 0 scores 3, rank 1 scores 2, each counted once.
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
