"""A rank's stream over sharded data: records read in file order, checked, shuffled in bounded chunks
and annotated with their position, pass after pass (raydiff.data.shards says which shards).

    RankStream(d, plan, rank, world, start=(pass, cursor, offset, taken)).batches(batch_size) -> numpy batches

Each training worker reads its own rows (paths and captions, or the bytes of embedded images) and
decodes them in parallel Ray tasks, a few chunks ahead, in order. Each sample carries its position
(pass, shard cursor, offset within the shard where its shuffle chunk starts, place in the chunk), so a
worker knows exactly where it stopped; a resumed stream seeks there and decodes nothing it skips.
Driver memory does not grow with the data: only shard names and counts leave it.

Why not a Ray Data pipeline per worker: an endless read operator ran hundreds of blocks ahead of the
consumer and Ray Data's resource budget then starved the decode stage for minutes on a small machine;
a bounded chunk pipeline keeps memory and order under raydiff's control.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import ray

from raydiff.config import DataConfig
from raydiff.data.cache_io import row_to_sample
from raydiff.data.decode import DecodeRow, count_skipped
from raydiff.data.metadata import BadSample, SampleError, resolve_path
from raydiff.data.records import iter_records
from raydiff.data.shards import ShardPlan, shard_id

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("prompt", "caption", "text", "txt")


# --- records -> rows ------------------------------------------------------------------------------

def to_row(record: dict, d: DataConfig, kind: str, shard: int, index: int) -> dict | BadSample:
    """A record as the decode stage takes it: prompt, one value per data_file_key (a checked absolute
    path, a URL, or the file's bytes) and `_row`, a sample id unique across shards (`shard` is the
    shard's `shard_id`)."""
    if kind == "cache":  # an encoded sample, written by raydiff.data.cache_shards
        return record
    row_id = (shard << 32) + index
    if "__bad__" in record:
        return BadSample(row_id, record.get("__key__"), record["__bad__"])
    if kind == "webdataset":
        record = _webdataset_fields(record, d)
    out = {"prompt": _prompt(record), "_row": row_id}
    for key in d.data_file_keys:
        value = record.get(key)
        if isinstance(value, dict):  # Hugging Face datasets' image layout {bytes, path}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            out[key] = bytes(value)
            continue
        if not isinstance(value, str) or not value:
            return BadSample(row_id, None, f"empty or non-path value in column {key!r}")
        resolved = resolve_path(value, d.base_path, d.allow_outside_base)
        if resolved is None:
            return BadSample(row_id, value, "path escapes base_path; set data.allow_outside_base: true to allow")
        out[key] = resolved
    return out


def _webdataset_fields(record: dict, d: DataConfig) -> dict:
    image = next((record[e] for e in IMAGE_EXTENSIONS if e in record), None)
    out = {d.data_file_keys[0]: image}
    if "txt" in record:
        out["prompt"] = record["txt"].decode("utf-8", errors="replace")
    elif "json" in record:
        meta = json.loads(record["json"])
        out["prompt"] = next((meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str)), "")
    return out


def _prompt(record: dict) -> str:
    prompt = record.get("prompt")
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8", errors="replace")
    return "" if prompt is None or prompt != prompt else str(prompt)  # NaN from pandas-written parquet


# --- the rank's stream ------------------------------------------------------------------------------

class PassReader:
    """The rank's good rows of one pass, from record `offset` of its `cursor`-th shard on: its shards in
    order, bad rows raised or counted and dropped. `cursor` and `offset` always name the next record to
    read, so a chunk's start is where a resumed stream seeks to (records before `offset` in that shard
    are skipped unread where the format allows: parquet row groups)."""

    def __init__(self, d: DataConfig, plan: ShardPlan, shards: list[int], cursor: int, offset: int,
                 counter_name: str | None):
        self.d, self.plan, self.shards, self.counter_name = d, plan, shards, counter_name
        self.cursor, self.offset = cursor, offset
        self._records = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while self.cursor < len(self.shards):
            shard = self.shards[self.cursor]
            uri, kind = self.plan.shards[shard], self.plan.kinds[shard]
            if self._records is None:
                self._records = iter_records(uri, kind, start=self.offset)
            for record in self._records:
                index = self.offset
                self.offset += 1
                row = to_row(record, self.d, kind, shard_id(uri), index)
                if not isinstance(row, BadSample):
                    return row
                bad = BadSample(row.row, row.file, f"{row.reason} (shard {uri}, record {index})")
                if not self.d.skip_bad_samples:
                    raise SampleError(bad)
                count_skipped(self.counter_name, bad)
            self.cursor, self.offset, self._records = self.cursor + 1, 0, None
        raise StopIteration


def stream_rows(d: DataConfig, plan: ShardPlan, rank: int, world: int, start: Sequence[int] = (0, 0, 0, 0),
                counter_name: str | None = None) -> Iterator[dict]:
    """The rank's rows from `start` on, pass after pass. A pass is read in chunks of `data.shuffle_buffer`
    rows, each shuffled by a seed of where it starts. A row carries its position `_pass`, `_cursor`,
    `_offset` (its chunk starts at record `_offset` of the rank's `_cursor`-th shard of that pass) and
    `_taken` (its place in the shuffled chunk), and `_rep` (= pass, for per-pass caption dropout).

    `start` = (pass, cursor, offset, taken): resume reads that chunk again and drops its first `taken`
    rows, so a resumed stream reads at most one chunk and the rest of one shard's records twice, and
    decodes nothing twice."""
    pass_index, cursor, offset, skip = start
    while True:
        reader = PassReader(d, plan, plan.rank_shards(pass_index, rank, world), cursor, offset, counter_name)
        empty = (cursor, offset) == (0, 0)
        while True:
            at = (reader.cursor, reader.offset)
            chunk = list(itertools.islice(reader, d.shuffle_buffer))
            if not chunk:
                break
            empty = False
            if d.shuffle:
                random.Random(f"{plan.seed}/chunk/{pass_index}/{rank}/{at[0]}/{at[1]}").shuffle(chunk)
            for taken, row in enumerate(chunk[skip:], start=skip):
                yield {**row, "_pass": pass_index, "_cursor": at[0], "_offset": at[1], "_taken": taken,
                       "_rep": pass_index}
            skip = 0
        if empty:
            raise SampleError(BadSample(-1, None, f"rank {rank} has no usable samples in pass {pass_index}"))
        pass_index, cursor, offset = pass_index + 1, 0, 0


def next_position(batch: dict) -> tuple[int, int, int, int]:
    """The stream position after the last sample of a batch (what a checkpoint records)."""
    return (int(batch["_pass"][-1]), int(batch["_cursor"][-1]), int(batch["_offset"][-1]),
            int(batch["_taken"][-1]) + 1)


def decode_chunk(rows: list[dict], d: DataConfig, seed: int, counter_name: str | None) -> list[dict]:
    """A Ray task: decode a chunk of rows (bad ones raised, or dropped and counted)."""
    if rows and any("#shape" in k for k in rows[0]):  # cached samples are encoded already
        return [row_to_sample(row) for row in rows]
    decode = DecodeRow(d, seed, counter_name)
    return [sample for row in rows for sample in decode(row)]


class RankStream:
    """This rank's endless stream of decoded samples, in order: rows are read in this process and decoded
    `chunk` at a time in Ray tasks (`data.num_cpus` each), at most `ahead` chunks in flight. Bounded by
    construction: a reading thread never runs more than `ahead` chunks past the consumer."""

    def __init__(self, d: DataConfig, plan: ShardPlan, rank: int, world: int, start: Sequence[int],
                 counter_name: str | None = None, chunk: int = 64, ahead: int = 4):
        self.d, self.seed, self.counter_name = d, plan.seed, counter_name
        self.rows = stream_rows(d, plan, rank, world, tuple(start), counter_name)
        self.chunk, self.ahead, self.pending = chunk, ahead, deque()
        self.task = ray.remote(decode_chunk).options(num_cpus=d.num_cpus)

    def samples(self) -> Iterator[dict]:
        while True:
            while len(self.pending) < self.ahead:
                rows = list(itertools.islice(self.rows, self.chunk))
                self.pending.append(self.task.remote(rows, self.d, self.seed, self.counter_name))
            yield from ray.get(self.pending.popleft())

    def batches(self, size: int) -> Iterator[dict]:
        """Numpy batches of `size` samples, as Ray Data's `iter_batches(batch_format="numpy")` gives them."""
        samples = self.samples()
        while True:
            group = list(itertools.islice(samples, size))
            yield {k: _column([s[k] for s in group]) for k in group[0]}


def _column(values: list) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if isinstance(values[0], str):
        return np.array(values, dtype=object)
    return np.asarray(values)
