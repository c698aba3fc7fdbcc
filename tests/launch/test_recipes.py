"""Issue 17's recipes through the real trainer (2 DDP workers on Ray): an int8-quantized base under the
LoRA, bitsandbytes' 8-bit AdamW, an EMA with validation samples drawn from it, and a resume that ends on
the EMA and LoRA of the uninterrupted run. Two TorchTrainer runs, ~25 s each here."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raydiff.launch.trainer import launch_training_task
from raydiff.training.checkpoint_store import COMPLETE_FILE
from raydiff.training.ema import EMA_FILE
from raydiff.training.lora_formats import LORA_FILE

pytestmark = pytest.mark.slow


def test_int8_base_8bit_adam_and_ema_train_on_two_workers_and_resume_exactly(ray_session, make_config):
    sections = dict(model={"quantize": "int8"},
                    train={"optimizer": "adamw8bit", "max_steps": 4, "save_steps": 2,
                           "ema": {"decay": 0.5, "start_step": 1}},
                    validation={"prompts": ["a red circle"], "use_ema": True, "steps": 2, "height": 32, "width": 32,
                                "every_steps": 4},
                    ray={"num_workers": 2, "cpus_per_worker": 1})
    cfg = make_config("recipes", **sections)
    result = launch_training_task(cfg)
    final = Path(result.checkpoint.path)
    assert final.name == "checkpoint-000004"
    assert {EMA_FILE, LORA_FILE, "samples"} <= set(os.listdir(final))
    assert (final / "samples" / "grid.png").exists()  # sampled with the EMA swapped in, then swapped out
    ema, lora = load_file(str(final / EMA_FILE)), load_file(str(final / LORA_FILE))
    assert ema.keys() == lora.keys() and any(not torch.equal(ema[k], lora[k]) for k in lora)

    # A second run that stopped after step 2: the first run's checkpoint-000002 in its own run directory.
    resumed_dir = Path(cfg.ray.storage_path, "recipes-resumed")
    shutil.copytree(Path(cfg.ray.storage_path, "recipes", "checkpoint-000002"), resumed_dir / "checkpoint-000002")
    assert (resumed_dir / "checkpoint-000002" / COMPLETE_FILE).exists()
    again = Path(launch_training_task(make_config("recipes-resumed", **sections)).checkpoint.path)
    assert again.name == "checkpoint-000004"
    for name in (EMA_FILE, LORA_FILE):  # weights, 8-bit Adam state and EMA all came back exactly
        expected, actual = load_file(str(final / name)), load_file(str(again / name))
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
