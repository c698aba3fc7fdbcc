"""Every family trains end to end through the same `raydiff train` path, from its example tiny config: in the
test's process (local mode, which trains what one Ray worker trains: tests/launch/test_local_mode.py), and the
ControlNet on two workers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from raydiff.config import load_config
from raydiff.data.shapes import (
    write_clips_dataset,
    write_control_dataset,
    write_edit_dataset,
    write_shapes_dataset,
    write_vace_dataset,
)
from raydiff.launch.trainer import launch_training_task
from raydiff.registry import get_pipeline_class

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


# (example, its model variant, its data): every family's tiny.yaml, and the Wan 2.2 and still-image variants.
# FLUX.1's examples/flux/tiny.yaml is trained by the Ctrl-C test (test_hardening.py) and `raydiff demo`'s FLUX.1
# config by test_demo.py, which checks its checkpoint as below; FLUX.1 Kontext's by the edit demo.
CASES = {
    "qwen_image_edit_plus": ("qwen_image_edit/tiny.yaml", None, "edits"),
    "qwen_image": ("qwen_image/tiny.yaml", None, "shapes"),
    "sd3": ("sd3/tiny.yaml", None, "shapes"),
    "wan": ("wan/tiny.yaml", None, "clips"),
    "wan_images": ("wan/tiny_images.yaml", None, "shapes"),
    "wan22_a14b_low": ("wan22/tiny_a14b_low.yaml", "wan22_a14b", "clips"),
    "wan22_ti2v_5b": ("wan22/tiny_ti2v_5b.yaml", "wan22_ti2v_5b", "clips"),
    "wan_i2v": ("wan_i2v/tiny.yaml", None, "clips"),
    "wan_vace": ("wan_vace/tiny.yaml", None, "vace"),
    "z_image": ("z_image/tiny.yaml", None, "shapes"),
    "flux2_klein": ("flux2/tiny.yaml", None, "shapes"),
    "flux_controlnet": ("flux/tiny_controlnet.yaml", None, "control"),  # on 2 workers: DDP around a ControlNet
}
WORKERS = {"flux_controlnet": 2}  # the others: 0, local mode
WRITERS = {"shapes": lambda d: write_shapes_dataset(d, n=8), "clips": write_clips_dataset, "vace": write_vace_dataset,
           "control": lambda d: write_control_dataset(d, n=8), "edits": lambda d: write_edit_dataset(d, n=8)}


@pytest.mark.parametrize("case", list(CASES))
def test_family_trains_from_its_tiny_example(case, ray_session, tiny_model, tmp_path, lora_key_warnings):
    example, variant, data_kind = CASES[case]
    family = load_config(ROOT / "examples" / example, ["model.path=unused"]).model.family
    data = tmp_path / "data"
    meta = WRITERS[data_kind](str(data))
    cfg = load_config(ROOT / "examples" / example,
                      [f"model.path={tiny_model(family, variant)}", f"data.base_path={data}",
                       f"data.metadata_path={meta}", f"ray.storage_path={tmp_path / 'runs'}",
                       f"data.cache_dir={tmp_path / 'cache'}",  # the examples that train from a cache
                       "train.max_steps=2", f"ray.num_workers={WORKERS.get(case, 0)}"])
    result = launch_training_task(cfg)
    ckpt = result.checkpoint.path
    if cfg.model.controlnet is not None:
        return check_controlnet_checkpoint(cfg, ckpt)
    assert sorted(os.listdir(ckpt)) == [".raydiff-complete", "README.md", "config.yaml", "loss.png",
                                        "pytorch_lora_weights.safetensors", "trainer_state.json", "training_state.pt"]
    state = json.loads(Path(ckpt, "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(np.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
    if cfg.data.preprocess == "cache":
        assert state["workers"][0]["models"] == ["transformer"]
        assert json.loads(Path(tmp_path, "cache", "manifest.json").read_text())["complete"]
    if cfg.model.expert == "low":  # only the low-noise expert is loaded; its LoRA keeps diffusers' transformer. keys
        assert "transformer_2" in state["workers"][0]["models"] and "transformer" not in state["workers"][0]["models"]
        with safe_open(str(Path(ckpt, "pytorch_lora_weights.safetensors")), "pt") as f:
            assert all(k.startswith("transformer.blocks.") for k in f.keys())
    if cfg.eval.every_steps:
        assert any("eval_loss" in h for h in state["log_history"])
    # The LoRA trained on Ray loads into the family's diffusers pipeline without key warnings.
    pipe = get_pipeline_class(family).load_diffusers(cfg.model.path)
    into = {"load_into_transformer_2": True} if cfg.model.expert == "low" else {}
    assert lora_key_warnings(lambda: pipe.load_lora_weights(ckpt, **into)) == []
    assert getattr(pipe, cfg.model.denoiser or "transformer").peft_config


def check_controlnet_checkpoint(cfg, ckpt: str) -> None:
    """A ControlNet trained on Ray in cache mode: its checkpoint's controlnet/ folder loads with the family's
    ControlNet class, and the worker held only the frozen DiT and the ControlNet (the encoders ran ahead)."""
    assert sorted(os.listdir(ckpt)) == [".raydiff-complete", "README.md", "config.yaml", "controlnet", "loss.png",
                                        "trainer_state.json", "training_state.pt"]
    state = json.loads(Path(ckpt, "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(np.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
    assert sorted(w["rank"] for w in state["workers"]) == list(range(cfg.ray.num_workers))
    assert all(sorted(w["models"]) == ["controlnet", "transformer"] for w in state["workers"])
    family = get_pipeline_class(cfg.model.family)
    controlnet = family.controlnet_class.from_pretrained(str(Path(ckpt, "controlnet")))
    assert controlnet.config.num_layers == cfg.model.controlnet.num_layers
    assert "FluxControlNetModel.from_pretrained" in Path(ckpt, "README.md").read_text()
