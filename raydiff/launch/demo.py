"""`raydiff demo`: the whole path on a laptop — tiny FLUX, a shapes dataset, 2 Ray workers, a LoRA."""

from __future__ import annotations

import os
import time

import yaml

from raydiff.config import load_config
from raydiff.console import say
from raydiff.data.shapes import write_shapes_dataset
from raydiff.launch.trainer import launch_training_task
from raydiff.pipelines.flux import FluxImagePipeline


def demo_config(directory: str, steps: int, num_workers: int) -> dict:
    return {
        "model": {"family": "flux", "path": os.path.join(directory, "models", "tiny-flux"), "dtype": "float32",
                  "max_sequence_length": 32},
        "data": {"base_path": os.path.join(directory, "data", "shapes"),
                 "metadata_path": os.path.join(directory, "data", "shapes", "metadata.csv"),
                 "height": 32, "width": 32, "repeat": 4},
        "lora": {"rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "train": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": 2, "save_steps": max(steps // 2, 1),
                  "log_steps": 1, "lr_warmup_steps": 0},
        "validation": {"prompts": ["a red circle", "a blue square", "a green triangle"], "steps": 8,
                       "height": 32, "width": 32, "guidance": 3.5},
        "ray": {"num_workers": num_workers, "storage_path": os.path.join(directory, "runs"),
                "name": time.strftime("demo-%Y%m%d-%H%M%S")},
    }


def run_demo(directory: str = "raydiff-demo", steps: int = 8, num_workers: int = 2):
    start = time.perf_counter()
    directory = os.path.abspath(directory)
    model_dir = os.path.join(directory, "models", "tiny-flux")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        FluxImagePipeline.write_tiny(model_dir)
    write_shapes_dataset(os.path.join(directory, "data", "shapes"), n=16)
    raw = demo_config(directory, steps, num_workers)
    config_path = os.path.join(directory, "demo.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    say(f"[raydiff] demo: tiny FLUX in {model_dir}, config {config_path}")
    result = launch_training_task(load_config(config_path))
    say(f"[raydiff] demo finished in {time.perf_counter() - start:.1f} s; validation grid (base above, "
          f"LoRA below): {os.path.join(result.checkpoint.path, 'samples', 'grid.png')}")
    say(result.checkpoint.path)
    return result
