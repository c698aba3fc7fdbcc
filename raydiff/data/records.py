"""Reading the records of one shard, in file order: parquet, jsonl and csv rows, WebDataset samples.

Plain readers (pyarrow for parquet and the filesystem, the standard library for the rest) that stream a
file once, start to end, from local disk or S3; what a record means is raydiff.data.stream's business.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator

import pyarrow.fs as pafs

from raydiff.data.metadata import is_url


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI (s3://... with the AWS SDK's settings)."""
    if is_url(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def iter_records(uri: str, kind: str, start: int = 0) -> Iterator[dict]:
    """A shard's records in file order from record `start` on: table rows, or WebDataset samples
    ({"__key__", ext: bytes}). Parquet skips the row groups before `start` unread; the other formats are
    read through from the top (they have no index)."""
    fs, path = filesystem(uri)
    if kind in ("parquet", "cache"):
        yield from _parquet_records(fs, path, start)
        return
    records = _stream_records(fs, path, kind)
    yield from itertools.islice(records, start, None)


def _parquet_records(fs, path: str, start: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        first_group, first = 0, 0  # the row group holding record `start`, and its first record
        while first_group < pf.metadata.num_row_groups and first + pf.metadata.row_group(first_group).num_rows <= start:
            first += pf.metadata.row_group(first_group).num_rows
            first_group += 1
        groups, skip = list(range(first_group, pf.metadata.num_row_groups)), start - first
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
            rows = batch.to_pylist()
            yield from rows[skip:]
            skip = max(0, skip - len(rows))


def _stream_records(fs, path: str, kind: str) -> Iterator[dict]:
    with fs.open_input_stream(path) as raw:
        if kind == "webdataset":
            yield from _tar_samples(raw)
        elif kind == "jsonl":
            for line in io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape"):
                if line.strip():
                    yield _json_record(line)
        else:
            yield from csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                       newline=""))


def _json_record(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return {"__bad__": f"invalid JSON: {err}"}
    return record if isinstance(record, dict) else {"__bad__": f"row is not a JSON object but {type(record).__name__}"}


class _TailWatch:
    """A read-only stream that remembers its last bytes: a whole tar ends in zero blocks, while tarfile
    stops silently at a cut between two members."""

    def __init__(self, raw):
        self.raw, self.tail = raw, b""

    def read(self, size=-1):
        data = self.raw.read(size)
        self.tail = (self.tail + data)[-1024:]
        return data

    def truncated(self) -> bool:
        return len(self.tail) < 1024 or any(self.tail)


def _tar_samples(raw) -> Iterator[dict]:
    """WebDataset: consecutive members sharing a key (the name up to its first dot) form one sample."""
    stream, sample = _TailWatch(raw), None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # uncompressed tars, as WebDataset writes
            for member in tar:
                if not member.isreg():
                    continue
                base = os.path.basename(member.name)
                key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                sample[ext] = tar.extractfile(member).read()
        if stream.truncated():
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError) as err:
        yield {"__key__": (sample or {}).get("__key__", ""), "__bad__": f"truncated or corrupt tar: {err}"}
        return
    if sample is not None:
        yield sample


def count_shard(uri: str, kind: str) -> int:
    """Records in one shard (a Ray task for the kinds without a row count in their footer)."""
    return sum(1 for _ in iter_records(uri, kind))
