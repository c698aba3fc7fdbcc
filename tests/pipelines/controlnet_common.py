"""Shared by the ControlNet tests: small batches and the family's tiny example turned into a ControlNet run."""

from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("flux", "qwen_image", "sd3")
PROMPTS = ["a red circle", "two blue squares on green grass"]
MAX_LEN = 16


def uint8_images(n=2, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def as_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], as collate makes it."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def conditions(inputs: dict) -> dict:
    """model_fn's keyword arguments among the units' outputs."""
    return {k: v for k, v in inputs.items() if k not in ("latents", "image", "control_image", "prompt")}


def controlnet_config(family: str, model_dir: str, **sections) -> dict:
    """The family's tiny example trained as a ControlNet: the tiny ControlNet of `model_dir` in full, inline.
    Section dicts are merged in; None removes a section."""
    raw = yaml.safe_load((ROOT / "examples" / family / "tiny.yaml").read_text())
    raw["model"].update(path=model_dir, max_sequence_length=MAX_LEN, controlnet={"path": f"{model_dir}/controlnet"})
    raw["data"].update(data_file_keys=["image", "control_image"], preprocess="inline", cache_dir=None)
    raw["lora"], raw["train"]["trainable_models"] = None, ["controlnet"]
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values} if values is not None else None
    return raw


def decoded_batch(control_seed: int = 1) -> dict:
    """Two decoded samples (as the decode stage gives them) with their control images."""
    return {"image": uint8_images(seed=0), "control_image": uint8_images(seed=control_seed),
            "prompt": np.array(PROMPTS), "_row": np.arange(2)}
