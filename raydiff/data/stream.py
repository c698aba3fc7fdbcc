"""A rank's stream over sharded data: records read in file order, checked, shuffled through a bounded
buffer and annotated with their position, pass after pass (raydiff.data.shards says which shards).

    RankStream(d, plan, rank, world, start=(pass, index)).batches(batch_size) -> numpy batches

Each training worker reads its own rows (paths and captions, or the bytes of embedded images) and
decodes them in parallel Ray tasks, a few chunks ahead, in order. Each sample carries `_pass` and
`_index` (its place in the rank's stream), so a worker knows exactly where it stopped; a resumed
stream replays the records of the current pass up to that place without decoding them. Driver memory
does not grow with the data: only shard names and counts leave it.

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
from collections.abc import Iterator

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

def pass_rows(d: DataConfig, plan: ShardPlan, rank: int, world: int, pass_index: int,
              counter_name: str | None) -> Iterator[dict]:
    """The rank's rows of one pass: its shards in order, bad rows raised or counted and dropped."""
    for shard in plan.rank_shards(pass_index, rank, world):
        uri, kind = plan.shards[shard], plan.kinds[shard]
        for index, record in enumerate(iter_records(uri, kind)):
            row = to_row(record, d, kind, shard_id(uri), index)
            if isinstance(row, BadSample):
                bad = BadSample(row.row, row.file, f"{row.reason} (shard {uri}, record {index})")
                if not d.skip_bad_samples:
                    raise SampleError(bad)
                count_skipped(counter_name, bad)
                continue
            yield row


def shuffled(rows: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A bounded shuffle: hold `size` rows, emit a random one for each row that arrives, then the rest."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = rng.randrange(size)
        buffer[j], row = row, buffer[j]
        yield row
    rng.shuffle(buffer)
    yield from buffer


def stream_rows(d: DataConfig, plan: ShardPlan, rank: int, world: int, start: tuple[int, int],
                counter_name: str | None = None) -> Iterator[dict]:
    """The rank's rows from `start` = (pass, index) on, pass after pass, each with `_pass`, `_index` and
    `_rep` (= pass, for per-pass caption dropout). Rows before `start` in its pass are read but dropped."""
    pass_index, skip = start
    while True:
        rows = pass_rows(d, plan, rank, world, pass_index, counter_name)
        if d.shuffle:
            rows = shuffled(rows, d.shuffle_buffer, random.Random(f"{plan.seed}/buffer/{pass_index}/{rank}"))
        index = -1
        for index, row in enumerate(rows):
            if index >= skip:
                yield {**row, "_pass": pass_index, "_index": index, "_rep": pass_index}
        if index < 0:
            raise SampleError(BadSample(-1, None, f"rank {rank} has no usable samples in pass {pass_index}"))
        pass_index, skip = pass_index + 1, 0


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

    def __init__(self, d: DataConfig, plan: ShardPlan, rank: int, world: int, start: tuple[int, int],
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
