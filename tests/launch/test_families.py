"""Every family trains end to end through the same `raydiff train` path, from its example tiny config."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from raydiff.config import load_config
from raydiff.data.shapes import write_clips_dataset, write_shapes_dataset
from raydiff.launch.trainer import launch_training_task

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIRS = {"flux2_klein": "flux2"}  # examples/<dir>/tiny.yaml, where the directory is not the family's name
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["flux", "qwen_image", "sd3", "wan", "z_image", "flux2_klein"])
def test_family_trains_from_its_tiny_example(family, ray_session, tiny_model, tmp_path):
    example = ROOT / "examples" / EXAMPLE_DIRS.get(family, family) / "tiny.yaml"
    data = tmp_path / "data"
    meta = write_clips_dataset(str(data)) if family == "wan" else write_shapes_dataset(str(data), n=8)
    cfg = load_config(example, [f"model.path={tiny_model(family)}", f"data.base_path={data}",
                                f"data.metadata_path={meta}", f"ray.storage_path={tmp_path / 'runs'}",
                                f"data.cache_dir={tmp_path / 'cache'}",  # qwen_image's example trains from a cache
                                "train.max_steps=2", "ray.num_workers=1"])
    result = launch_training_task(cfg)
    ckpt = result.checkpoint.path
    assert sorted(os.listdir(ckpt)) == [".raydiff-complete", "README.md", "config.yaml", "loss.png",
                                        "pytorch_lora_weights.safetensors", "trainer_state.json", "training_state.pt"]
    state = json.loads(Path(ckpt, "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(np.isfinite(h["loss"]) for h in state["log_history"])
    if cfg.data.preprocess == "cache":
        assert state["workers"][0]["models"] == ["transformer"]
        assert json.loads(Path(tmp_path, "cache", "manifest.json").read_text())["complete"]
