"""What a person looks at after a run: validation samples and grid, loss.png, TensorBoard events, the model card;
with a LoKr adapter, so the whole loop also runs with an adapter other than LoRA."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_train import prediction_change  # noqa: E402  (pytest puts tests/launch on sys.path)

from raydiff.launch.trainer import launch_training_task

pytestmark = pytest.mark.slow


def test_checkpoints_carry_samples_grid_and_loss_plot_and_tensorboard_has_scalars(ray_session, make_config,
                                                                                  tiny_model):
    cfg = make_config("see", lora={"type": "lokr", "lokr_factor": 4},
                      train={"max_steps": 4, "save_steps": 2, "learning_rate": 5e-3},
                      validation={"prompts": ["a red circle", "a blue square"], "steps": 2, "height": 32,
                                  "width": 48, "guidance": 1.0},
                      logging={"tensorboard": True}, ray={"num_workers": 0})  # local mode
    ckpt = Path(launch_training_task(cfg).checkpoint.path)
    samples = [Image.open(ckpt / "samples" / f"{i}.png") for i in range(2)]
    assert all(im.size == (48, 32) for im in samples)
    grid = np.asarray(Image.open(ckpt / "samples" / "grid.png").convert("RGB")).astype(int)
    assert grid.shape == (64, 96, 3)  # base row over LoRA row, one column per prompt
    assert np.abs(grid[:32] - grid[32:]).max() > 0  # the trained adapter changes the images
    with Image.open(ckpt / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100
    assert (Path(cfg.ray.storage_path) / "see" / "checkpoint-000002" / "samples" / "grid.png").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.ray.storage_path, "see", "tensorboard")))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"train/lr", "train/samples_per_second", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"], "validation grids are logged as images"

    # The model card shows the grid and the samples, and says how diffusers loads a LoKr checkpoint, which it does.
    card = (ckpt / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["widget"] == [{"text": "a red circle", "output": {"url": "samples/0.png"}},
                               {"text": "a blue square", "output": {"url": "samples/1.png"}}]
    assert "![validation grid" in card and "pipe.transformer.load_lora_adapter" in card
    _, changed = prediction_change(tiny_model, lambda pipe: pipe.transformer.load_lora_adapter(
        str(ckpt), weight_name="pytorch_lora_weights.safetensors", prefix="transformer"))
    assert changed
