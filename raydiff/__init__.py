"""raydiff: fine-tune diffusion transformers (FLUX.1, Qwen-Image, SD3, Wan) with LoRA or fully, on Ray."""

from raydiff.config import RaydiffConfig, load_config

__version__ = "0.1.0"
__all__ = ["RaydiffConfig", "load_config", "train", "tune", "__version__"]


def train(config: RaydiffConfig, module_factory=None):
    """Train on Ray and return Ray's Result; see `raydiff.launch.trainer.launch_training_task`."""
    from raydiff.launch.trainer import launch_training_task

    return launch_training_task(config, module_factory)


def tune(config: RaydiffConfig, param_space: dict | None = None, module_factory=None):
    """Search config values with Ray Tune, one Ray Train run per trial, and return Tune's ResultGrid;
    see `raydiff.launch.tune.tune`."""
    from raydiff.launch.tune import tune as run_tune

    return run_tune(config, param_space, module_factory)
