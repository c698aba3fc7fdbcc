"""What the driver hands every training worker besides the config (light: the worker reads it first)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raydiff.config import RaydiffConfig, from_remote


@dataclass
class LoopArgs:
    """`config`: the payload of `raydiff.config.to_remote`. `steps_per_epoch`: optimizer steps each worker
    takes per epoch; `total_steps`: of the whole run (epochs or `train.max_steps`, whichever ends first).
    `packed`: dataset rows are whole bucket batches. `empty_prompt`: the encoded empty prompt (caption
    dropout in stream/cache mode; in stream mode the ObjectRef of the task encoding it). `eval_set`: the
    ObjectRef of the eval samples (raydiff.data.eval_set.start_eval_set), None without eval. `skip_counter`: the
    actor counting skipped samples. `run_dir`: where
    rank 0 writes TensorBoard events. `module_factory(device)`: builds the training module instead of
    the config-driven one. `relay`: a `RelayChannel` that carries rank 0's console output to the
    driver (None: rank 0 prints itself). `dataset`: what the final checkpoint's model card says about the
    training data (`model_card.dataset_summary`: size, trigger words). `storage`: in local mode
    (`ray.num_workers: 0`), the (filesystem, run directory) raydiff stores checkpoints in itself."""

    config: dict
    steps_per_epoch: int
    total_steps: int
    packed: bool = False
    empty_prompt: Any = None  # dict[str, np.ndarray] | ray.ObjectRef | None
    eval_set: Any = None  # ray.ObjectRef of list[dict] | None
    skip_counter: str | None = None
    run_dir: str = "."
    is_tty: bool | None = None
    module_factory: Callable | None = None
    relay: Any = None
    shards: Any = None  # raydiff.data.shards.ShardPlan of sharded data, which each worker streams itself
    dataset: dict | None = None
    storage: Any = None

    def parse_config(self) -> RaydiffConfig:
        return from_remote(self.config)
