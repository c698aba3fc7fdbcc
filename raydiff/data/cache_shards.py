"""The encoded-sample cache of sharded data: one cache file per source shard.

`raydiff preprocess` (or the first cache-mode `raydiff train`) encodes each source shard in an encoder
actor — its records read in file order, decoded (and flipped) as the stream would, encoded in batches —
into `shards/src-<hash of the shard's name>.parquet`. `manifest.json` records, per source shard, the
file it was encoded into, its size and modification stamp, and its sample count: shards, never rows.
Adding shards to a dataset encodes only those; a changed shard is encoded again; a different model or
preprocessing setting rebuilds the cache. Training then streams the cache files like any sharded data.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow.parquet as pq
import ray

from raydiff.config import RaydiffConfig, from_remote
from raydiff.config.libraries import hide_unused_libraries
from raydiff.console import quiet_libraries, say
from raydiff.data.cache import cache_settings, describe_changes, model_identity
from raydiff.data.cache_io import CacheLayout, write_empty_prompt, write_encoded
from raydiff.data.decode import DecodeRow
from raydiff.data.encode import run_encoder_actors, start_empty_prompt
from raydiff.data.metadata import BadSample, SampleError
from raydiff.data.records import filesystem, iter_records
from raydiff.data.shards import ShardPlan, plan_shards, shard_id
from raydiff.data.stream import to_row

FORMAT = "sharded-1"


def cache_file(source: str) -> str:
    return f"shards/src-{hashlib.sha256(source.encode()).hexdigest()[:16]}.parquet"


def source_stamp(source: str) -> str:
    """Size and modification time of a source shard (what decides whether it is encoded again)."""
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    return f"{info.size}:{info.mtime_ns or 0}"


def preprocess_sharded(cfg: RaydiffConfig) -> ShardPlan:
    """Encode the source shards the cache lacks (or holds stale) and return the plan of the cache files."""
    d = cfg.data
    layout = CacheLayout(d.cache_dir)
    identity = {"format": FORMAT, "model": model_identity(cfg), "settings": cache_settings(cfg)}
    manifest = layout.read_manifest() or {}
    if manifest and {k: manifest.get(k) for k in identity} != identity:
        say(f"[raydiff] cache {d.cache_dir} is stale ({describe_changes(manifest, identity)}); re-encoding")
        layout.clear()
        manifest = {}
    sources = plan_shards(d, cfg.train.seed).shards
    known = manifest.get("sources", {})
    stamps = {s: source_stamp(s) for s in sources}
    todo = [s for s in sources if known.get(s, {}).get("stamp") != stamps[s] or not layout.exists(cache_file(s))]
    if todo:
        say(f"[raydiff] encoding {len(todo)} of {len(sources)} shards into the cache {d.cache_dir}")
        run_encoder_actors(SourceWriter, cfg, [{"source": s} for s in todo])
    if not layout.exists(layout.empty_prompt()):
        write_empty_prompt(layout, ray.get(start_empty_prompt(cfg)))
    entries = {s: {"file": cache_file(s), "stamp": stamps[s], "samples": _rows(layout, cache_file(s))}
               for s in sources}
    layout.write_manifest({**identity, "sources": entries, "num_samples": sum(e["samples"] for e in entries.values())})
    files = [layout.uri(e["file"]) for e in entries.values() if e["samples"]]
    return ShardPlan(tuple(files), ("cache",) * len(files), tuple(e["samples"] for e in entries.values()
                                                                   if e["samples"]), cfg.train.seed)


def _rows(layout: CacheLayout, name: str) -> int:
    with layout.fs.open_input_file(layout.uri(name)) as f:
        return pq.read_metadata(f).num_rows


class SourceWriter:
    """The actor class of `preprocess_sharded` (raydiff.data.encode.run_encoder_actors): each item names one
    source shard, which this actor decodes and encodes, in file order, into its cache file (skipped records
    listed in the file's metadata)."""

    def __init__(self, config: dict):
        quiet_libraries()
        cfg = from_remote(config)
        hide_unused_libraries(cfg)  # an actor serves one run
        from raydiff.data.encoder import Encoder  # here: the driver imports this module, and no torch

        self.cfg, self.encoder, self.layout = cfg, Encoder(cfg), CacheLayout(cfg.data.cache_dir)
        self.decode = DecodeRow(cfg.data.model_copy(update={"skip_bad_samples": False}), cfg.train.seed)

    def write(self, item: dict) -> None:
        """item: {"source": the source shard's path or URI}."""
        source = item["source"]
        samples, skipped = self._decoded(source)
        write_encoded(self.layout, cache_file(source), self.encoder, samples, skipped, self.cfg.data.encoder_batch_size)

    def _decoded(self, source: str) -> tuple[list[dict], list[dict]]:
        d, kind = self.cfg.data, ("webdataset" if self.cfg.data.format == "webdataset"
                                  else os.path.splitext(source)[1].lower().lstrip("."))
        samples, skipped = [], []
        for index, record in enumerate(iter_records(source, kind)):
            row = to_row(record, d, kind, shard_id(source), index)
            try:
                if isinstance(row, BadSample):
                    raise SampleError(row)
                samples += self.decode(row)
            except SampleError as err:
                if not d.skip_bad_samples:
                    raise SampleError(BadSample(err.bad.row, err.bad.file, f"{err.bad.reason} (shard {source}, "
                                                                           f"record {index})")) from None
                skipped.append({"row": err.bad.row, "file": err.bad.file, "reason": err.bad.reason})
        return samples, skipped
