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

import itertools
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import ray.train

from raydiff.config import RaydiffConfig
from raydiff.data.collate import collate
from raydiff.data.plan import CaptionDropout
from raydiff.training.loop_args import LoopArgs
from raydiff.training.step import step_seed

# Local mode's Ctrl-C (raydiff.launch.trainer.fit_interruptibly): the driver sets it, and the feed, running in
# the driver's training thread, stops at its next batch, closing its Ray Data readers as it unwinds.
_STOP_LOCAL = threading.Event()


def stop_local_feed() -> None:
    _STOP_LOCAL.set()


class EpochFeed:
    """This rank's batches. A bucket batch (`args.packed`) arrives as one dataset row. A fresh run (no
    checkpoint) starts fetching epoch 0 at construction.

    Listed data comes from Ray Train's split of the driver's dataset, one pass per epoch. Sharded data
    (`args.shards`) comes from this rank's own endless stream (raydiff.data.stream), which runs on across
    epochs; `position` = (pass, shard cursor, offset, taken) of its next sample (raydiff.data.stream) is what
    a checkpoint records and `restore` resumes from."""

    def __init__(self, cfg: RaydiffConfig, args: LoopArgs, device, *, fresh: bool):
        t, ctx = cfg.train, ray.train.get_context()
        self.seed, self.rank, self.world = t.seed, ctx.get_world_rank(), ctx.get_world_size()
        self.device, self.keys, self.accum = device, cfg.data.data_file_keys, t.gradient_accumulation_steps
        self.micro_per_epoch = args.steps_per_epoch * t.gradient_accumulation_steps
        self.rows_per_batch = 1 if args.packed else t.batch_size
        # Decoded samples (or bucket batches) held for the local shuffle; capped: they sit in host memory.
        self.shuffle_buffer = min(self.micro_per_epoch * self.rows_per_batch, 256) if cfg.data.shuffle else None
        empty = args.empty_prompt
        if isinstance(empty, ray.ObjectRef):  # stream mode: encoded by a task the driver started
            empty = ray.get(empty)
        self.dropout = CaptionDropout(cfg.data.caption_dropout, t.seed, empty) if cfg.data.caption_dropout > 0 else None
        self.wait_s = 0.0
        # Local mode: Ray shuts down in this process right after the loop, and a thread still reading from Ray
        # Data then makes Ray end the process (docs/ray_notes.md), so closing waits for the reading threads.
        self.close_wait_s = 5.0 if cfg.ray.local else 0.0
        _STOP_LOCAL.clear()  # a new run in this process
        self.data, self.plan, self.counter = cfg.data, args.shards, args.skip_counter
        self.position: tuple[int, ...] | None = None if self.plan is None else (0, 0, 0, 0)
        self.stream = None
        if self.plan is None:
            self.shard = ray.train.get_dataset_shard("train")
        self.early = Prefetched(self._batches(0)) if fresh else None

    def restore(self, positions: list) -> None:
        """Continue this rank's stream where a checkpoint left it (sharded data; listed data skips instead)."""
        if self.plan is not None and positions:
            self.position = tuple(positions[self.rank])

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list[dict]]:
        """Lists of `gradient_accumulation_steps` collated micro-batches. The first `skip` micro-batches
        (trained before a resume) and the remainder past the planned steps are not yielded: listed data
        reads them (every rank must drain its split before the next epoch starts), a sharded stream has
        already moved past them."""
        window = []
        for micro, batch in self._micro_batches(epoch, skip):
            if _STOP_LOCAL.is_set():
                raise KeyboardInterrupt("stopped by the driver")
            if skip <= micro < self.micro_per_epoch:
                window.append(collate(batch, self.device, self.keys, caption_dropout=self.dropout, epoch=epoch))
                if len(window) == self.accum:
                    yield window
                    window = []

    def _micro_batches(self, epoch: int, skip: int):
        if self.plan is None:
            yield from enumerate(self._timed(self._source(epoch)))
            return
        from raydiff.data.stream import next_position

        if self.stream is None:  # one stream for the whole run: it continues across epochs
            early, self.early = self.early, None
            self.stream = iter(self._timed(early if early is not None else Prefetched(self._batches(epoch))))
        for micro in range(skip, self.micro_per_epoch):
            batch = next(self.stream)
            self.position = next_position(batch)
            yield micro, batch

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
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    self.wait_s += time.perf_counter() - start
                yield batch
        finally:
            close(it)
            close(batches, self.close_wait_s)  # a Prefetched source: its thread closes the Ray Data iterator

    def close(self) -> None:
        """Stop this rank's stream (sharded data): an endless Ray Data execution left open would keep its
        reading task, and the CPUs it holds, after the run."""
        stream, self.stream = self.stream, None
        close(stream)
        close(self.early, self.close_wait_s)

    def _batches(self, epoch: int):
        if self.plan is not None:
            from raydiff.data.stream import RankStream  # here: the reader imports the decode stage

            stream = RankStream(self.data, self.plan, self.rank, self.world, self.position, self.counter)
            return stream.batches(self.rows_per_batch)
        if self.shuffle_buffer is None:
            return self.shard.iter_batches(batch_size=self.rows_per_batch, batch_format="numpy", drop_last=True,
                                           prefetch_batches=2)
        blocks = self.shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        rng = np.random.default_rng(step_seed(self.seed, epoch, 0, self.rank, self.world))
        return shuffled_batches(blocks, self.rows_per_batch, self.shuffle_buffer, rng)


def shuffled_batches(blocks, batch_size: int, chunk: int, rng: np.random.Generator):
    """numpy blocks -> batches of `batch_size` rows, the rows permuted in chunks of `chunk` (a last partial
    batch is dropped). Rows stay views into their blocks until a batch copies its own: Ray Data's local
    shuffle buffer re-concatenated and re-converted its buffer, a fifth of a small step's CPU
    (docs/performance.md, section 7)."""
    rows, ready = [], []
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            rows += [(block, i) for i in range(len(next(iter(block.values()))))]
        if len(rows) >= chunk or (block is None and rows):
            ready += [rows[i] for i in rng.permutation(len(rows))]
            rows = []
        while len(ready) >= batch_size:
            picked, ready = ready[:batch_size], ready[batch_size:]
            yield {k: _rows_column([b[k][i:i + 1] for b, i in picked]) for k in picked[0][0]}


def _rows_column(parts: list[np.ndarray]) -> np.ndarray:
    """One column of a batch from its rows' 1-row slices. Blocks agree on a column's layout unless its
    tensors vary in shape (edit sources): Ray gives a block whose rows share a shape a (n, ...) array and
    another an object array, so such a mix becomes an object array of the rows' tensors."""
    if len({(p.dtype == object, p.shape[1:]) for p in parts}) == 1:
        return np.concatenate(parts)
    out = np.empty(len(parts), dtype=object)
    for j, p in enumerate(parts):
        out[j] = p[0]
    return out


def close(it, wait_s: float = 0.0) -> None:
    """Close a generator-like iterator (or a `Prefetched`, waiting up to `wait_s` for its thread) if it can be
    closed."""
    if isinstance(it, Prefetched):
        it.close(wait_s)
    elif it is not None and hasattr(it, "close"):
        it.close()


class Prefetched:
    """Iterate `iterable` from a thread that starts at once, holding up to `depth` items ahead."""

    _END = object()

    def __init__(self, iterable, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iterable,), daemon=True, name="raydiff-prefetch")
        self.thread.start()

    def _fill(self, iterable) -> None:
        it = iter(iterable)
        try:
            for item in it:
                while not self._offer(item):
                    if self.stopped.is_set():
                        return
                if self.stopped.is_set():
                    return
            self._offer(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self._offer(err)
        finally:
            close(it)

    def _offer(self, item) -> bool:
        try:
            self.queue.put(item, timeout=0.5)
            return True
        except queue.Full:
            return False

    def close(self, wait_s: float = 0.0) -> None:
        """Stop fetching; the fetching thread closes the source iterator, within `wait_s` if given."""
        self.stopped.set()
        if wait_s:
            self.thread.join(wait_s)

    def __iter__(self):
        while (item := self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item
