"""Files of the encoded-sample cache: layout, the parquet codec and the shard-writing actor.

Encoded columns (raydiff.data.encode) are stored per sample as three parquet columns, `name`
(raw bytes), `name#shape` and `name#dtype`: no pickle, readable by any parquet reader. Paths go
through a pyarrow filesystem, so `data.cache_dir` may be a local directory or an s3:// URI.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydiff.data.metadata import is_url
from raydiff.data.plan import order_key

SKIPPED_KEY = b"raydiff.skipped"  # parquet metadata: the rows a shard's writer skipped
EVAL_IDENTITY_KEY = b"raydiff.eval_identity"  # parquet metadata: what the cached eval set was encoded from
READ_ROWS = 64  # samples per block read back from a shard


class CacheLayout:
    """`manifest.json`, `empty_prompt.parquet`, `eval_set.parquet` and `shards/shard-NNNNNN.parquet` under one
    root."""

    def __init__(self, uri: str):
        self.fs, self.root = pafs.FileSystem.from_uri(uri if is_url(uri) else os.path.abspath(uri))

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def shard(self, k: int) -> str:
        return f"shards/shard-{k:06d}.parquet"

    def empty_prompt(self) -> str:
        return "empty_prompt.parquet"

    def eval_set(self) -> str:
        return "eval_set.parquet"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.uri(name)).type == pafs.FileType.File

    def read_manifest(self) -> dict | None:
        if not self.exists("manifest.json"):
            return None
        with self.fs.open_input_stream(self.uri("manifest.json")) as f:
            return json.loads(f.read().decode())

    def write_manifest(self, manifest: dict) -> None:
        self._atomic_write("manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))

    def write_table(self, name: str, table: pa.Table) -> None:
        self._atomic_write(name, lambda f: pq.write_table(table, f))

    def _atomic_write(self, name: str, write) -> None:
        """Write to a temp name, then rename: a file under its final name is always complete."""
        final = self.uri(name)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            write(f)
        self.fs.move(tmp, final)

    def clear(self) -> None:
        """Delete the files a cache consists of (and only those)."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=True)):
            name = info.path[len(self.root) + 1:]
            ours = (name.startswith("shards/shard-") or name.startswith("empty_prompt.parquet")
                    or name.startswith("eval_set.parquet") or name.startswith("manifest.json"))
            if info.type == pafs.FileType.File and ours:
                self.fs.delete_file(info.path)

    def shard_stats(self, n: int) -> tuple[list[int], list[dict]]:
        """Samples in each of the first `n` shards, and the rows their writers skipped."""
        counts, skipped = [], []
        for k in range(n):
            with self.fs.open_input_file(self.uri(self.shard(k))) as f:
                meta = pq.read_metadata(f)
            counts.append(meta.num_rows)
            skipped += json.loads((meta.metadata or {}).get(SKIPPED_KEY, b"[]"))
        return counts, skipped

    def index(self, shards: list[str]) -> list[tuple[int, list[int]]]:
        """(_row, bucket) of every sample in `shards`, the bucket [h, w] it was decoded to, or [frames, h, w]
        for a clip with data.frame_buckets: two small columns, no tensors read."""
        out = []
        for name in shards:
            table = pq.read_table(self.uri(name), columns=["_row", "_size"], filesystem=self.fs)
            out += list(zip(table.column("_row").to_pylist(), table.column("_size").to_pylist()))
        return out


def write_encoded(layout: CacheLayout, name: str, encoder, samples: list[dict], skipped: list[dict],
                  batch_size: int, extra=None) -> None:
    """Encode decoded `samples` `batch_size` at a time with `encoder` (raydiff.data.encoder.Encoder) and write
    them as the cache file `name`, listing the `skipped` records in its metadata. `extra(chunk)`: columns to
    add to each chunk before encoding (the shard writer's `_size`)."""
    parts = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        cols = {key: [s[key] for s in chunk] for key in chunk[0]}
        parts.append(columns_to_table(encoder.encode({**cols, **(extra(chunk) if extra else {})})))
    table = pa.concat_tables(parts) if parts else columns_to_table({})
    layout.write_table(name, table.replace_schema_metadata({SKIPPED_KEY: json.dumps(skipped)}))


# --- codec ------------------------------------------------------------------------------------

def columns_to_table(cols: dict, skipped: list[dict] | None = None) -> pa.Table:
    """Numpy columns of n samples -> a parquet-ready table; tensors as bytes + shape + dtype."""
    arrays = {}
    for name, values in cols.items():
        if name == "prompt":
            arrays[name] = pa.array([str(p) for p in values], pa.string())
        elif name == "_size":
            arrays[name] = pa.array([[int(x) for x in v] for v in values], pa.list_(pa.int32()))
        elif name.startswith("_"):
            arrays[name] = pa.array(np.asarray(values, dtype=np.int64))
        else:
            values = [np.ascontiguousarray(v) for v in values]
            arrays[name] = pa.array([v.tobytes() for v in values], pa.binary())
            arrays[f"{name}#shape"] = pa.array([list(v.shape) for v in values], pa.list_(pa.int32()))
            arrays[f"{name}#dtype"] = pa.array([v.dtype.str for v in values], pa.string())
    table = pa.table(arrays) if arrays else pa.table({"_row": pa.array([], pa.int64())})
    return table.replace_schema_metadata({SKIPPED_KEY: json.dumps(skipped or [])})


def table_to_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The inverse of `columns_to_table`."""
    names = table.column_names
    out = {}
    for name in names:
        if "#" in name:
            continue
        values = table.column(name).to_pylist()
        if f"{name}#shape" in names:
            shapes, dtypes = table.column(f"{name}#shape").to_pylist(), table.column(f"{name}#dtype").to_pylist()
            arrays = [np.frombuffer(b, dtype=np.dtype(dt)).reshape(sh) for b, sh, dt in zip(values, shapes, dtypes)]
            if len({a.shape for a in arrays}) == 1:
                out[name] = np.stack(arrays)
            else:
                out[name] = np.empty(len(arrays), dtype=object)
                out[name][:] = arrays
        elif name == "_size":  # [h, w] or [frames, h, w] per sample
            out[name] = np.array(values, dtype=np.int64).reshape(len(values), -1 if values else 2)
        elif name == "prompt":
            out[name] = np.array(values, dtype=object)
        else:
            out[name] = np.asarray(values)
    return out


def row_to_sample(row: dict) -> dict:
    """One cached row (a dict from a cache file) -> its sample: tensors rebuilt from bytes, shape, dtype."""
    out = {}
    for name, value in row.items():
        if "#" in name:
            continue
        if f"{name}#shape" in row:
            out[name] = np.frombuffer(value, dtype=np.dtype(row[f"{name}#dtype"])).reshape(row[f"{name}#shape"])
        else:
            out[name] = value
    return out


@dataclass
class ReadShards:
    """Ray Data `map_batches` over `{"shard": name}` rows: each cache shard's samples as encoded numpy
    columns, `READ_ROWS` at a time. raydiff knows its files, so it reads them directly: `read_parquet`'s
    listing and footer-reading stage costs seconds before the first row (docs/performance.md)."""

    cache_dir: str

    def __call__(self, batch: dict):
        layout = CacheLayout(self.cache_dir)
        for name in batch["shard"]:
            with layout.fs.open_input_file(layout.uri(str(name))) as f:
                for part in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS):
                    yield table_to_columns(pa.Table.from_batches([part]))


def write_empty_prompt(layout: CacheLayout, cols: dict) -> None:
    layout.write_table(layout.empty_prompt(), columns_to_table(cols))


def read_empty_prompt(layout: CacheLayout) -> dict[str, np.ndarray]:
    return table_to_columns(pq.read_table(layout.uri(layout.empty_prompt()), filesystem=layout.fs))


def write_eval_set(layout: CacheLayout, samples: list[dict], identity: dict) -> None:
    """The encoded eval samples (raydiff.data.eval_set), stamped with what they were encoded from."""
    columns = {key: [s[key] for s in samples] for key in samples[0]}
    table = columns_to_table(columns).replace_schema_metadata({EVAL_IDENTITY_KEY: json.dumps(identity)})
    layout.write_table(layout.eval_set(), table)


def read_eval_set(layout: CacheLayout, identity: dict) -> list[dict] | None:
    """The cached eval samples if they were encoded from `identity`, else None."""
    if not layout.exists(layout.eval_set()):
        return None
    table = pq.read_table(layout.uri(layout.eval_set()), filesystem=layout.fs)
    if json.loads((table.schema.metadata or {}).get(EVAL_IDENTITY_KEY, b"null")) != identity:
        return None
    columns = table_to_columns(table)
    return [{key: column[i] for key, column in columns.items()} for i in range(table.num_rows)]


@dataclass
class RepeatCached:
    """flat_map: one cached sample -> its `repeat` copies (`copies[_row]` for the rows listed there:
    regularization samples) with `_rep` and `_key`; with `slots`, only the copies planned into a bucket
    batch, with `_batch` and `_slot` (their place in it)."""

    repeat: int
    seed: int
    shuffle: bool = True
    slots: dict | None = None
    copies: dict | None = None

    def __call__(self, row: dict) -> list[dict]:
        out = []
        n = self.copies.get(int(row["_row"]), self.repeat) if self.copies else self.repeat
        for rep in range(n):
            copy = {**row, "_rep": rep, "_key": order_key(self.seed, row["_row"], rep, self.shuffle)}
            if self.slots is not None:
                slot = self.slots.get((int(row["_row"]), rep))
                if slot is None:
                    continue
                copy["_batch"], copy["_slot"] = slot
            out.append(copy)
        return out
