"""Sharded datasets: which shards there are, how many samples each holds, and which shards each rank
reads in each pass — decided in the driver from shard names and counts only, never rows.

`data.metadata_path` names shards (`DataConfig.sharded`) when it is a directory, a glob (`s3://bucket/laion/part-*.parquet`),
a list of files, or when `data.format` is `webdataset`. Shards are parquet, jsonl, csv (one metadata
row per line, paths relative to `data.base_path`, or the image bytes themselves in a parquet column)
or WebDataset tars (`.jpg`/`.png`/`.webp` with `.txt` or `.json` captions).

Order (docs/data.md): in pass p, the shards are permuted by (seed, p) and dealt to the ranks, each next
shard to the rank holding the fewest samples so far, so ranks get equal shares however unequal the
shards. Each rank streams its shards in shuffled chunks of `data.shuffle_buffer` (raydiff.data.stream).
A rank that ends a pass starts its next: streams never run dry, so every rank trains the same number
of batches per epoch, and a rank's remainder rolls into its next pass.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs

from raydiff.config import DataConfig, UserError
from raydiff.data.metadata import is_url
from raydiff.data.records import count_shard, filesystem

KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".tar": "webdataset"}  # and "cache" files
_GLOB = set("*?[")  # data.metadata_path is sharded when DataConfig.sharded says so


def shard_kind(uri: str, d: DataConfig) -> str:
    if d.format == "webdataset":
        return "webdataset"
    kind = KINDS.get(os.path.splitext(uri)[1].lower())
    if kind is None:
        raise UserError(f"{uri}: not a shard raydiff reads (.parquet, .jsonl, .csv, or .tar with "
                        f"data.format: webdataset)")
    return kind


def list_shards(d: DataConfig) -> list[str]:
    """Every shard `data.metadata_path` names, sorted; refuses a pattern that matches nothing or a
    listed file that does not exist (in seconds: names only, no rows read)."""
    patterns = d.metadata_path if isinstance(d.metadata_path, list) else [d.metadata_path]
    shards = []
    for pattern in patterns:
        found = _expand(pattern, d)
        if not found:
            raise UserError(f"data.metadata_path {pattern}: no shards found there")
        shards += found
    return sorted(dict.fromkeys(shards))


def _expand(pattern: str, d: DataConfig) -> list[str]:
    """The shard files a directory, glob or file URI names (URIs keep their scheme)."""
    scheme = pattern[: pattern.index("://") + 3] if is_url(pattern) else ""
    if _GLOB & set(pattern):
        head = pattern[: min(pattern.index(c) for c in _GLOB if c in pattern)]
        fs, base = filesystem(head.rsplit("/", 1)[0] if "/" in head else ".")
        glob = pattern[len(scheme):] if scheme else os.path.abspath(pattern)
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        return [scheme + e.path for e in entries if e.type == pafs.FileType.File and fnmatch.fnmatch(e.path, glob)]
    fs, path = filesystem(pattern)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [scheme + path]
    if info.type != pafs.FileType.Directory:
        return []
    suffixes = (".tar",) if d.format == "webdataset" else tuple(KINDS)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return [scheme + e.path for e in entries if e.type == pafs.FileType.File and e.path.lower().endswith(suffixes)
            and not os.path.basename(e.path).startswith((".", "_"))]


def count_samples(shards: list[str], d: DataConfig) -> list[int]:
    """Samples per shard: parquet footers (read here, in threads), the others counted in Ray tasks that
    read each file once (a tar's member headers, a text file's lines)."""
    kinds = [shard_kind(s, d) for s in shards]
    counts: list[int | None] = [None] * len(shards)
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i, n in zip([i for i, k in enumerate(kinds) if k == "parquet"],
                        pool.map(_parquet_rows, [s for s, k in zip(shards, kinds) if k == "parquet"])):
            counts[i] = n
    others = [i for i, n in enumerate(counts) if n is None]
    if others:
        import ray

        task = ray.remote(count_shard).options(num_cpus=d.num_cpus)
        for i, n in zip(others, ray.get([task.remote(shards[i], kinds[i]) for i in others])):
            counts[i] = n
    return [int(n) for n in counts]


def _parquet_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f).num_rows


def shard_id(uri: str) -> int:
    """A 31-bit id from a shard's file name, so sample ids (`shard_id << 32 | record`) stay the same when
    shards are added to a dataset (flips and caption dropout are decided by sample id)."""
    digest = hashlib.blake2b(os.path.basename(uri).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class ShardPlan:
    """What a worker needs to stream its share: shard URIs and kinds, their sample counts, the seed."""

    shards: tuple[str, ...]
    kinds: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def rank_shards(self, pass_index: int, rank: int, world: int) -> list[int]:
        """The shard indices rank `rank` reads in pass `pass_index`, in order: the shards permuted by
        (seed, pass), each dealt to the rank with the fewest samples so far (ties to the lower rank)."""
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}/shards/{pass_index}").shuffle(order)
        loads, mine = [0] * world, []
        for index in order:
            r = min(range(world), key=lambda k: loads[k])
            loads[r] += self.counts[index]
            if r == rank:
                mine.append(index)
        return mine


def plan_shards(d: DataConfig, seed: int) -> ShardPlan:
    """List and count the shards (names and counts only: the driver holds no rows)."""
    shards = list_shards(d)
    counts = count_samples(shards, d) if d.num_samples is None else _even(d.num_samples, len(shards))
    return ShardPlan(tuple(shards), tuple(shard_kind(s, d) for s in shards), tuple(counts), seed)


def _even(total: int, n: int) -> list[int]:
    """`data.num_samples` spread over `n` shards (for balancing; the streams do not depend on it)."""
    return [total // n + (i < total % n) for i in range(n)]
