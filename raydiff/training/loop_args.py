"""What the driver hands every training worker besides the config (light: the worker reads it first)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from raydiff.config import RaydiffConfig, from_remote


class Sealed:
    """A value pickled (with Ray's cloudpickle, as Ray would) where it is sealed, and unpickled only where it
    is opened. Ray Train's controller unpickles the loop's arguments too, and a family class registered in the
    driver or a `module_factory` would make it import what they import (diffusers, transformers, peft:
    seconds before every run's first step, docs/performance.md section 1)."""

    def __init__(self, value: Any):
        self.data = ray.cloudpickle.dumps(value)

    def open(self) -> Any:
        return ray.cloudpickle.loads(self.data)


def seal(value: Any) -> Sealed | None:
    return value if value is None or isinstance(value, Sealed) else Sealed(value)


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

    config: dict  # sealed (`Sealed`) once constructed, as is module_factory
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

    def __post_init__(self):
        self.config, self.module_factory = seal(self.config), seal(self.module_factory)

    def parse_config(self) -> RaydiffConfig:
        return from_remote(self.config.open())

    def build_module(self, device):
        """The training module from `module_factory` (None when the config builds it)."""
        return None if self.module_factory is None else self.module_factory.open()(device)
