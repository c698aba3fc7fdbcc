"""The training and eval datasets as Ray Data pipelines, one builder per `data.preprocess` mode.

    inline  rows -> decode                         workers run every unit
    stream  rows -> decode -> encoder actor pool   workers load only the DiT
    cache   parquet written once (raydiff.data.cache) -> read; workers load only the DiT

Metadata is read (and paths checked) in the driver, so a typo fails before any worker starts.
Rows are ordered (and, with buckets, batched) in the driver by per-sample decisions that do not
depend on the mode (raydiff.data.plan), so the three modes give the same samples in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import ray

from raydiff.config import DataConfig, RaydiffConfig, UserError, to_remote
from raydiff.console import say
from raydiff.data.buckets import bucket_batches, row_buckets
from raydiff.data.cache import preprocess
from raydiff.data.cache_io import CacheLayout, ReadShards, RepeatCached, read_empty_prompt
from raydiff.data.cache_shards import preprocess_sharded
from raydiff.data.decode import DecodeRow, count_skipped_rows
from raydiff.data.encode import EncodeBatch, start_empty_prompt
from raydiff.data.eval_set import start_eval_set
from raydiff.data.metadata import BadSample, family_max_paths, is_regularization, train_and_eval_rows
from raydiff.data.packing import pack_group
from raydiff.data.plan import order_rows
from raydiff.data.shards import ShardPlan, plan_shards


@dataclass
class TrainData:
    """What the trainer needs about the training dataset.

    `packed`: rows are whole bucket batches (iterate with batch_size=1). `num_samples`: samples per
    epoch before the split; `num_batches`: bucket batches per epoch (None unless packed).
    `empty_prompt`: encoded empty prompt for caption dropout in stream/cache mode (stream mode: the ObjectRef of
    its encoding task, `ray.get` by the workers). `shards`: the shard
    plan of sharded data, whose workers build their own pipelines (then `dataset` is None).
    """

    dataset: ray.data.Dataset | None
    num_samples: int
    packed: bool = False
    num_batches: int | None = None
    empty_prompt: dict[str, np.ndarray] | ray.ObjectRef | None = None
    shards: ShardPlan | None = None  # sharded data: each worker streams its share (raydiff.data.stream)


def build_train_data(cfg: RaydiffConfig, rows: list[dict] | None, seed: int, counter_name: str | None = None,
                     empty_prompt: ray.ObjectRef | None = None) -> TrainData:
    """`rows` from `read_rows` (repeated) -> the dataset for the configured mode. `seed` is `train.seed`:
    it orders the samples and picks the flips. Sharded data (`rows` None) gets a shard plan instead.
    `empty_prompt`: stream mode's encoded empty prompt, when a task the caller started already encodes it
    (raydiff.data.eval_set); else stream mode starts its own."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.data.sharded:
        return _sharded_data(cfg, seed)
    if cfg.data.preprocess == "cache":
        data = _cached_data(cfg, rows, seed, counter_name)
    else:
        data = _decoded_data(cfg, rows, seed, counter_name, empty_prompt)
    # Ray's equal split deals bundles greedily to the emptiest worker, so which rank trains which
    # sample depends on bundle sizes. Blocks of exactly one batch (strict) make it round-robin by
    # batch in every mode and on every run: rank r trains batches r, r + W, r + 2W, ...
    rows_per_block = 1 if data.packed else cfg.train.batch_size
    data.dataset = data.dataset.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    return data


def build_cache(cfg: RaydiffConfig, rows=None) -> None:
    """`raydiff preprocess`: encode the dataset into `data.cache_dir` (sharded data shard by shard), and the
    eval set too, so that no training run loads the encoders for it. `rows`: `train_and_eval_rows`' result,
    read here when not given."""
    rows, eval_rows, _ = rows or train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))
    if cfg.data.sharded:
        preprocess_sharded(cfg)
    else:
        preprocess(cfg, rows)
    if eval_rows:
        samples = ray.get(start_eval_set(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"preprocess": "cache"})}), eval_rows).samples)
        if len(samples) == len(eval_rows):
            say(f"[raydiff] eval set: {len(samples)} samples in the cache")
        else:  # raydiff.data.eval_set keeps a set with skipped rows out of the cache
            say(f"[raydiff] eval set not cached: {len(eval_rows) - len(samples)} of its {len(eval_rows)} rows are bad "
                "samples, which each run skips and counts")


def _sharded_data(cfg: RaydiffConfig, seed: int) -> TrainData:
    """Names and counts only: every worker streams its own share of the shards (of the cache's files in
    cache mode, encoding what the cache lacks first)."""
    d = cfg.data
    plan = preprocess_sharded(cfg) if d.preprocess == "cache" else plan_shards(d, seed)
    empty = read_empty_prompt(CacheLayout(d.cache_dir)) if d.preprocess == "cache" and d.caption_dropout else None
    workers = cfg.ray.ranks
    if len(plan.shards) < workers:
        raise UserError(f"{len(plan.shards)} shards cannot give each of ray.num_workers {workers} workers a "
                        f"share; split the data into at least {workers} shards")
    return TrainData(None, plan.num_samples, empty_prompt=empty, shards=plan)


def build_dataset(cfg: DataConfig, rows: list[dict], *, seed: int, counter_name: str | None = None) -> ray.data.Dataset:
    """Rows (or bucket batches) -> a lazy Ray Data pipeline of decoded samples
    {key: uint8 (H, W, 3) or (F, H, W, 3), prompt, _row, ...} in the order given; `seed` picks the flips."""
    # Blocks of ~64 rows: enough tasks to keep decoders busy, few enough that task overhead stays small.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), max(8, len(rows) // 64))))
    return ds.flat_map(DecodeRow(cfg, seed, counter_name), num_cpus=cfg.num_cpus)


def _encoded(ds: ray.data.Dataset, cfg: RaydiffConfig, batch_size: int, actors: int) -> ray.data.Dataset:
    d = cfg.data
    return ds.map_batches(EncodeBatch, fn_constructor_args=(to_remote(cfg),), batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=d.encoder_num_gpus,
                          num_cpus=d.encoder_num_cpus)


def _decoded_data(cfg: RaydiffConfig, rows: list[dict], seed: int, counter_name: str | None,
                  empty_prompt: ray.ObjectRef | None = None) -> TrainData:
    """inline and stream: metadata rows ordered (and batched into buckets) in the driver, decoded in
    Ray Data tasks, encoded by the actor pool in stream mode."""
    d, t = cfg.data, cfg.train
    ordered = order_rows(rows, seed, d.shuffle)
    batches = None
    if d.buckets:
        sizes, unread = row_buckets(d, ordered)
        count_skipped_rows(counter_name, unread)
        batches = bucket_batches([r for r in ordered if r["_row"] in sizes], sizes, batch_size=t.batch_size,
                                 num_workers=cfg.ray.ranks)
        items = [{"_batch": i, "_rows": json.dumps(b)} for i, b in enumerate(batches)]
    else:
        items = ordered
    ds = build_dataset(d, items, seed=seed, counter_name=counter_name)
    empty = None
    if d.preprocess == "stream":
        ds = _encoded(ds, cfg, 1 if batches else d.encoder_batch_size, actors=d.encoder_actors)
        if d.caption_dropout > 0:  # encodes while the run starts
            empty = empty_prompt or start_empty_prompt(cfg)
    if batches is None:
        return TrainData(ds, len(items), empty_prompt=empty)
    return TrainData(ds, len(batches) * t.batch_size, True, len(batches), empty)


def _cached_data(cfg: RaydiffConfig, rows: list[dict], seed: int, counter_name: str | None) -> TrainData:
    """Train from the cache (building or refreshing it first when needed), repeated `data.repeat`
    times, in `_key` order — or packed into the same bucket batches the other modes form. The rows the
    cache skipped count as the other modes count theirs."""
    d, t = cfg.data, cfg.train
    preprocess(cfg, rows)
    layout = CacheLayout(d.cache_dir)
    manifest = layout.read_manifest()
    count_skipped_rows(counter_name, [BadSample(s["row"], s["file"], s["reason"]) for s in manifest.get("skipped", [])])
    files = [layout.shard(k) for k, n in enumerate(manifest["shards"]) if n]
    if not files:
        raise ValueError(f"the cache {d.cache_dir} holds no samples")
    cached = layout.index(files)  # [(_row, (h, w))] of every cached sample
    copies = _regularization_copies(rows or [])
    repeated = [{"_row": r} for r, _ in cached for _ in range(copies.get(r, d.repeat))]
    ordered = order_rows(sorted(repeated, key=lambda r: r["_row"]), seed, d.shuffle)
    ds = ray.data.from_items([{"shard": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(ReadShards(d.cache_dir), batch_size=1)
    empty = read_empty_prompt(layout) if d.caption_dropout > 0 else None
    if not d.buckets:
        # Sort into the order inline mode trains in. The driver knows every key, so it hands the sort
        # its partition boundaries: no sampling pass, and ~4096 rows a partition instead of 200 partitions.
        parts = max(2, min(200, len(ordered) // 4096))
        bounds = [ordered[i * len(ordered) // parts]["_key"] for i in range(1, parts)]
        ds = ds.flat_map(RepeatCached(d.repeat, seed, d.shuffle, copies=copies)).sort("_key", boundaries=bounds)
        return TrainData(ds, len(ordered), empty_prompt=empty)
    sizes = {r: tuple(size) for r, size in cached}
    batches = bucket_batches(ordered, sizes, batch_size=t.batch_size, num_workers=cfg.ray.ranks)
    slots = {(r["_row"], r["_rep"]): (b, i) for b, batch in enumerate(batches) for i, r in enumerate(batch)}
    # Two shuffles (group, then order the batches), each with about one partition per 64 batches.
    parts = max(2, min(200, len(batches) // 64))
    ds = ds.flat_map(RepeatCached(d.repeat, seed, d.shuffle, slots, copies)).groupby("_batch", num_partitions=parts)
    ds = ds.map_groups(pack_group, batch_format="numpy")
    ds = ds.sort("_batch", boundaries=[i * len(batches) // parts for i in range(1, parts)])
    return TrainData(ds, len(batches) * t.batch_size, True, len(batches), empty)


def _regularization_copies(rows: list[dict]) -> dict[int, int]:
    """{_row: copies per epoch} of the regularization samples among the training rows (the others are
    copied `data.repeat` times)."""
    ids = np.array([r["_row"] for r in rows], dtype=np.int64)
    reg, counts = np.unique(ids[is_regularization(ids)], return_counts=True)
    return dict(zip(reg.tolist(), counts.tolist()))
