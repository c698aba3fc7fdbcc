"""The encode stage: a pipeline's encode units (VAE, text encoders) run ahead of training, in Ray.

An `Encoder` (raydiff.data.encoder) loads the pipeline *without* the trainable models and runs the units
that touch none of them on decoded batches. Here it runs in Ray Data actors (`EncodeBatch`, stream mode)
and in the task that encodes the empty prompt for caption dropout. Its outputs become per-sample numpy
columns (raydiff.data.columns) that Ray Data carries to the workers (stream) or parquet stores (cache).

This module imports no torch: Ray Train's controller, its DatasetManager and Ray Data's SplitCoordinator
import it to unpickle a stream-mode dataset, each a new process in every run, and torch would cost each of
them 1.5 s (docs/performance.md section 1). The encoder is imported where it runs.
"""

from __future__ import annotations

import numpy as np
import ray

from raydiff.config import RaydiffConfig, from_remote, to_remote
from raydiff.config.libraries import hide_unused_libraries
from raydiff.console import quiet_libraries
from raydiff.data.packing import is_packed, map_packed


class EncodeBatch:
    """Ray Data `map_batches` class for stream mode: each actor holds one `Encoder`.
    Packed rows (bucket batches) are encoded batch by batch and stay packed."""

    def __init__(self, config: dict):
        cfg = from_remote(config)
        hide_unused_libraries(cfg)  # an actor serves one run
        quiet_libraries()
        from raydiff.data.encoder import Encoder  # here, not at the top: see the module docstring

        self.encoder = Encoder(cfg)

    def __call__(self, batch: dict) -> dict:
        return map_packed(self.encoder.encode, batch) if is_packed(batch) else self.encoder.encode(batch)


def encode_empty_prompt(config: dict) -> dict[str, np.ndarray]:
    """The empty prompt's encoded columns (batch of one), for caption dropout in stream/cache mode.
    Runs in a Ray task with the encoder's resources; loads the encoders once."""
    quiet_libraries()
    from raydiff.data.encoder import Encoder

    return Encoder(from_remote(config)).empty_prompt()


def start_empty_prompt(cfg: RaydiffConfig) -> ray.ObjectRef:
    """`encode_empty_prompt` started in a Ray task with an encoder actor's resources (the driver loads no model);
    `ray.get` the answer where it is needed, so the encoding overlaps whatever comes first (a run's start)."""
    return ray.remote(encode_empty_prompt).options(**encoder_task_options(cfg)).remote(to_remote(cfg))


def encoder_task_options(cfg: RaydiffConfig) -> dict:
    """Ray options of a task the driver starts to encode: an encoder actor's resources, scheduled outside the
    caller's placement group (DEFAULT; a Tune trial's holds only its driver), as Ray Data's tasks are."""
    d = cfg.data
    return {"num_cpus": d.encoder_num_cpus, "num_gpus": d.encoder_num_gpus, "scheduling_strategy": "DEFAULT"}


def run_encoder_actors(cls: type, cfg: RaydiffConfig, items: list[dict]) -> None:
    """`cls(config).write(item)` for each item, on `data.encoder_actors` Ray actors of `cls` (the cache's
    shard writers). Plain actors, not a Ray Data actor pool: Ray Data creates its actors restartable with
    their arguments in the object store, which Ray reports on the driver's terminal as an error line
    (ray-project/ray#53727). These take the small config inline; like Ray Data's, they restart and their
    calls are retried when a node is lost."""
    from ray.util import ActorPool

    actor = ray.remote(cls).options(**encoder_task_options(cfg), max_restarts=3, max_task_retries=3)
    config = to_remote(cfg)
    pool = ActorPool([actor.remote(config) for _ in range(min(cfg.data.encoder_actors, len(items)))])
    for _ in pool.map_unordered(lambda a, item: a.write.remote(item), items):
        pass
