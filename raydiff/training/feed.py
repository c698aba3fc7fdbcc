"""A worker's training data, epoch by epoch: its split of the Ray Data pipeline, batched and
locally shuffled the same way on every run.

Light on imports on purpose: the worker builds the feed first, so the pipeline's start-up (tasks,
first decodes) overlaps the seconds the model stack (diffusers, transformers, peft) takes to import
and load.
"""

from __future__ import annotations

import queue
import threading

import ray.train

from raydiff.config import RaydiffConfig


def step_seed(seed: int, step: int, micro: int, rank: int, world: int) -> int:
    """A distinct, reproducible seed for each (step, micro-batch, rank): resume needs no RNG state."""
    return (seed * 1_000_003 + (step * 4096 + micro) * world + rank) % (2**63)


class EpochFeed:
    """`feed.epoch(e)` iterates this rank's batches of epoch `e` (numpy dicts). `micro_per_epoch` is
    how many of them a worker trains on; a bucket batch (`packed`) arrives as one row.

    A fresh run (no checkpoint) starts fetching epoch 0 at construction."""

    def __init__(self, cfg: RaydiffConfig, steps_per_epoch: int, packed: bool, fresh: bool):
        t = cfg.train
        ctx = ray.train.get_context()
        self.seed, self.rank, self.world = t.seed, ctx.get_world_rank(), ctx.get_world_size()
        self.micro_per_epoch = steps_per_epoch * t.gradient_accumulation_steps
        self.rows_per_batch = 1 if packed else t.batch_size
        # Decoded samples (or bucket batches) held for the local shuffle; capped: they sit in host memory.
        self.shuffle_buffer = min(self.micro_per_epoch * self.rows_per_batch, 256) if cfg.data.shuffle else None
        self.shard = ray.train.get_dataset_shard("train")
        self.early = Prefetched(self._batches(0)) if fresh else None

    def epoch(self, epoch: int):
        if epoch == 0 and self.early is not None:
            early, self.early = self.early, None
            return early
        return self._batches(epoch)

    def _batches(self, epoch: int):
        # The split is deterministic (preserve_order), so a per-(epoch, rank) seeded local shuffle gives
        # each epoch a new order that a resumed run reproduces exactly.
        return self.shard.iter_batches(batch_size=self.rows_per_batch, batch_format="numpy", drop_last=True,
                                       prefetch_batches=2, local_shuffle_buffer_size=self.shuffle_buffer,
                                       local_shuffle_seed=step_seed(self.seed, epoch, 0, self.rank, self.world))


class Prefetched:
    """Iterate `iterable` from a thread that starts at once, holding up to `depth` items ahead."""

    _END = object()

    def __init__(self, iterable, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=self._fill, args=(iterable,), daemon=True, name="raydiff-prefetch").start()

    def _fill(self, iterable) -> None:
        try:
            for item in iterable:
                self.queue.put(item)
            self.queue.put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self.queue.put(err)

    def __iter__(self):
        while (item := self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item
