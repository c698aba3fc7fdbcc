"""The function Ray Train runs in each worker. A module of its own that imports neither torch nor the model
libraries at the top: Ray Train's controller imports it to unpickle the function, in a new process on the
critical path before the workers start (docs/performance.md section 1)."""

from __future__ import annotations

import contextlib

from raydiff.config.libraries import hide_unused_libraries
from raydiff.training.loop_args import LoopArgs


def train_loop_per_worker(loop_config: dict) -> None:
    """raydiff.training.loop.train_loop_per_worker, imported in the worker (the driver never imports
    diffusers, transformers or peft) once the worker's data feed has started, so the pipeline's
    start-up overlaps those imports and the model load."""
    import ray.train.torch

    from raydiff.training.checkpoint_store import has_checkpoint
    from raydiff.training.feed import EpochFeed

    args: LoopArgs = loop_config["args"]
    cfg = args.parse_config()
    if not cfg.ray.local:
        hide_unused_libraries(cfg)  # a worker process serves this run only (the driver may serve more)
    feed = EpochFeed(cfg, args, ray.train.torch.get_device(), fresh=not has_checkpoint(args.storage))
    from raydiff.training.loop import train_loop_per_worker as loop

    # Local mode: torch in the caller's process computes as a worker of ray.cpus_per_worker would.
    with torch_threads(int(cfg.ray.cpus_per_worker)) if cfg.ray.local else contextlib.nullcontext():
        loop(loop_config, feed)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` (at least 1), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)
