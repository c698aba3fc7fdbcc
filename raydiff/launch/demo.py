"""`raydiff demo`: the whole path on a laptop — a tiny model, synthetic data, 2 Ray workers, a LoRA.

`--task text-to-image` (the default): tiny FLUX.1 on coloured shapes. `--task edit`: tiny FLUX.1 Kontext on shapes
recoloured by instruction (examples/flux_kontext/tiny.yaml), its validation grid showing the sources above the
base model's and the LoRA's edits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from raydiff.config import load_config
from raydiff.console import say
from raydiff.data.shapes import write_edit_dataset, write_shapes_dataset
from raydiff.launch.trainer import launch_training_task
from raydiff.registry import get_pipeline_class


@dataclass(frozen=True)
class DemoTask:
    """What one demo trains: a tiny `family` on the data `write_data(directory)` writes under data/`data`."""

    family: str
    data: str
    write_data: Callable[[str], str]
    prompts: tuple[str, ...]
    images: tuple[str, ...] = ()  # validation sources, relative to the data folder: one per prompt
    model: dict = field(default_factory=dict)  # extra model keys
    data_file_keys: tuple[str, ...] = ("image",)
    grid: str = "base above, LoRA below"


TASKS = {
    "text-to-image": DemoTask("flux", "shapes", lambda d: write_shapes_dataset(d, n=16),
                              ("a red circle", "a blue square", "a green triangle")),
    # Kontext rather than Qwen-Image-Edit: its tiny model trains ~4x faster on CPU (no vision-language encoder).
    "edit": DemoTask("flux_kontext", "edits", lambda d: write_edit_dataset(d, n=16),
                     ("make the square green", "make the circle blue"), ("source/0000.png", "source/0002.png"),
                     model={"edit_image_pixels": 32 * 32}, data_file_keys=("image", "edit_image"),
                     grid="sources on top, then the base model, then the LoRA"),
}


def demo_config(directory: str, task: str, steps: int, num_workers: int) -> dict:
    spec, data = TASKS[task], os.path.join(directory, "data", TASKS[task].data)
    return {
        "model": {"family": spec.family, "path": os.path.join(directory, "models", f"tiny-{spec.family}"),
                  "dtype": "float32", "max_sequence_length": 32, **spec.model},
        "data": {"base_path": data, "metadata_path": os.path.join(data, "metadata.csv"),
                 "data_file_keys": list(spec.data_file_keys), "height": 32, "width": 32, "repeat": 4},
        "lora": {"rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "train": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": 2, "save_steps": max(steps // 2, 1),
                  "log_steps": 1, "lr_warmup_steps": 0},
        "validation": {"prompts": list(spec.prompts), "images": [os.path.join(data, p) for p in spec.images],
                       "steps": 8, "height": 32, "width": 32, "guidance": 3.5},
        "ray": {"num_workers": num_workers, "storage_path": os.path.join(directory, "runs"),
                "name": time.strftime("demo-%Y%m%d-%H%M%S")},
    }


def run_demo(directory: str = "raydiff-demo", steps: int = 8, num_workers: int = 2, task: str = "text-to-image"):
    start = time.perf_counter()
    directory, spec = os.path.abspath(directory), TASKS[task]
    model_dir = os.path.join(directory, "models", f"tiny-{spec.family}")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        get_pipeline_class(spec.family).write_tiny(model_dir)
    spec.write_data(os.path.join(directory, "data", spec.data))
    raw = demo_config(directory, task, steps, num_workers)
    config_path = os.path.join(directory, f"demo-{task}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    say(f"[raydiff] demo ({task}): tiny {spec.family} in {model_dir}, config {config_path}")
    result = launch_training_task(load_config(config_path))
    say(f"[raydiff] demo finished in {time.perf_counter() - start:.1f} s; validation grid ({spec.grid}): "
        f"{os.path.join(result.checkpoint.path, 'samples', 'grid.png')}")
    say(result.checkpoint.path)
    return result
