"""A worker's training data, epoch by epoch: its split of the Ray Data pipeline as ready model inputs.

    feed = EpochFeed(cfg, args, device, fresh=True)
    for micro_batches in feed.epoch(e, skip=k):   # one optimizer step's micro-batches, collated
        ...
    feed.take_wait_s()                             # seconds spent blocked on data since the last call

Light on imports on purpose (no diffusers, transformers or peft): the worker builds the feed first, so
the pipeline's start-up (tasks, first decodes) overlaps the seconds the model stack takes to import
and load. The split is deterministic (`preserve_order`), so a per-(epoch, rank) seeded local shuffle
gives each epoch a new order that a resumed run reproduces exactly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import ray.train

from raydiff.config import RaydiffConfig
from raydiff.data.collate import collate
from raydiff.data.plan import CaptionDropout
from raydiff.training.loop_args import LoopArgs
from raydiff.training.step import step_seed


class EpochFeed:
    """This rank's batches. A bucket batch (`args.packed`) arrives as one dataset row. A fresh run (no
    checkpoint) starts fetching epoch 0 at construction."""

    def __init__(self, cfg: RaydiffConfig, args: LoopArgs, device, *, fresh: bool):
        t, ctx = cfg.train, ray.train.get_context()
        self.seed, self.rank, self.world = t.seed, ctx.get_world_rank(), ctx.get_world_size()
        self.device, self.keys, self.accum = device, cfg.data.data_file_keys, t.gradient_accumulation_steps
        self.micro_per_epoch = args.steps_per_epoch * t.gradient_accumulation_steps
        self.rows_per_batch = 1 if args.packed else t.batch_size
        # Decoded samples (or bucket batches) held for the local shuffle; capped: they sit in host memory.
        self.shuffle_buffer = min(self.micro_per_epoch * self.rows_per_batch, 256) if cfg.data.shuffle else None
        self.dropout = (CaptionDropout(cfg.data.caption_dropout, t.seed, args.empty_prompt)
                        if cfg.data.caption_dropout > 0 else None)
        self.wait_s = 0.0
        self.shard = ray.train.get_dataset_shard("train")
        self.early = Prefetched(self._batches(0)) if fresh else None

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list[dict]]:
        """Lists of `gradient_accumulation_steps` collated micro-batches. The first `skip` micro-batches
        (trained before a resume) and the remainder past the planned steps are read but not yielded:
        every rank must drain its split before the next epoch starts."""
        window = []
        for micro, batch in enumerate(self._timed(self._source(epoch))):
            if skip <= micro < self.micro_per_epoch:
                window.append(collate(batch, self.device, self.keys, caption_dropout=self.dropout, epoch=epoch))
                if len(window) == self.accum:
                    yield window
                    window = []

    def take_wait_s(self) -> float:
        """Seconds spent waiting for batches since the previous call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def _source(self, epoch: int):
        if epoch == 0 and self.early is not None:
            early, self.early = self.early, None
            return early
        return self._batches(epoch)

    def _timed(self, batches):
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield batch

    def _batches(self, epoch: int):
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
