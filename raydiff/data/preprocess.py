"""The training dataset for each `data.preprocess` mode, and the encoded-sample cache.

    inline  rows -> decode                      workers run every unit (today's path)
    stream  rows -> decode -> encode actors     workers load only the DiT
    cache   parquet written once by `preprocess(cfg)` -> read_parquet; workers load only the DiT

The cache is a directory (local or s3://) of parquet shards, one per `SHARD_ROWS` metadata rows in
file order, named by index, each written to a temp name and renamed when complete: an interrupted
run resumes with the missing shards, a complete one is a no-op. Tensors are raw bytes + shape +
dtype columns (no pickle). `manifest.json` names the model, the preprocessing settings and a hash
of the inputs; any difference rebuilds the cache and says what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import ray

from raydiff.config import RaydiffConfig, to_dict
from raydiff.console import say
from raydiff.data.buckets import plan_batches, row_buckets
from raydiff.data.cache_io import (CacheLayout, RepeatCached, ShardWriter, decode_shard_batch, pack_group,
                                   read_empty_prompt, write_empty_prompt)
from raydiff.data.dataset import build_dataset
from raydiff.data.decode import VIDEO_KEYS
from raydiff.data.encode import EncodeBatch, encode_empty_prompt, trainable_names
from raydiff.data.metadata import is_url
from raydiff.data.plan import order_rows

FORMAT = 1
SHARD_ROWS = 256


@dataclass
class TrainData:
    """What the trainer needs about the training dataset.

    `packed`: rows are whole bucket batches (iterate with batch_size=1). `num_samples`: samples per
    epoch before the split; `num_batches`: bucket batches per epoch (None unless packed).
    `empty_prompt`: encoded empty prompt for caption dropout in stream/cache mode.
    """

    dataset: ray.data.Dataset
    num_samples: int
    packed: bool = False
    num_batches: int | None = None
    empty_prompt: dict[str, np.ndarray] | None = None


def build_train_data(cfg: RaydiffConfig, rows: list[dict], seed: int, counter_name: str | None = None) -> TrainData:
    """`rows` from `read_rows` (repeated) -> the dataset for the configured mode. The three modes give
    the same samples in the same order (`_key`, raydiff.data.plan) and, with buckets, the same batches.
    `seed` is `train.seed`: it orders the samples and picks the flips."""
    d = cfg.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = _cache_data(cfg, rows, seed) if d.preprocess == "cache" else _streamed_data(cfg, rows, seed, counter_name)
    # Ray's equal split deals bundles greedily to the emptiest worker, so which rank trains which
    # sample depends on bundle sizes. Blocks of exactly one batch (strict) make it round-robin by
    # batch in every mode and on every run: rank r trains batches r, r + W, r + 2W, ...
    rows_per_block = 1 if data.packed else cfg.train.batch_size
    data.dataset = data.dataset.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    return data


def _streamed_data(cfg: RaydiffConfig, rows: list[dict], seed: int, counter_name: str | None) -> TrainData:
    """inline and stream: metadata rows ordered (and batched into buckets) in the driver, decoded in
    Ray Data tasks, encoded by the actor pool in stream mode."""
    d = cfg.data
    ordered = order_rows(rows, seed, d.shuffle)
    batches = None
    if d.buckets:
        sizes, _ = row_buckets(d, ordered)
        batches = _bucket_batches(cfg, [r for r in ordered if r["_row"] in sizes], sizes)
        items = [{"_batch": i, "_rows": json.dumps(b)} for i, b in enumerate(batches)]
    else:
        items = ordered
    ds = build_dataset(d, items, seed=seed, counter_name=counter_name)
    empty = None
    if d.preprocess == "stream":
        ds = ds.map_batches(EncodeBatch, fn_constructor_args=(to_dict(cfg),),
                            batch_size=1 if batches else d.encoder_batch_size,
                            compute=ray.data.ActorPoolStrategy(size=d.encoder_actors), num_gpus=d.encoder_num_gpus,
                            num_cpus=d.encoder_num_cpus)
        if d.caption_dropout > 0:
            empty = ray.get(ray.remote(encode_empty_prompt).options(
                num_cpus=d.encoder_num_cpus, num_gpus=d.encoder_num_gpus).remote(to_dict(cfg)))
    if batches is None:
        return TrainData(ds, len(items), empty_prompt=empty)
    return TrainData(ds, len(batches) * cfg.train.batch_size, True, len(batches), empty)


def build_eval_dataset(cfg: RaydiffConfig, rows: list[dict], counter_name: str | None = None) -> ray.data.Dataset:
    """The eval set in file order, decoded without flips; in stream/cache mode also encoded by an actor
    pool, since those workers hold no encoders (eval sets are small: never cached)."""
    d = cfg.data.model_copy(update={"random_flip": False})
    ds = build_dataset(d, rows, seed=0, counter_name=counter_name)
    if d.preprocess == "inline":
        return ds
    return ds.map_batches(EncodeBatch, fn_constructor_args=(to_dict(cfg),), batch_size=d.encoder_batch_size,
                          compute=ray.data.ActorPoolStrategy(size=1), num_gpus=d.encoder_num_gpus,
                          num_cpus=d.encoder_num_cpus)


def _bucket_batches(cfg: RaydiffConfig, ordered: list[dict], sizes: dict) -> list[list[dict]]:
    t, workers = cfg.train, cfg.ray.num_workers
    batches = plan_batches(ordered, sizes, batch_size=t.batch_size, num_workers=workers)
    if not batches:
        raise ValueError(f"no aspect-ratio bucket holds {t.batch_size} x {workers} samples "
                         f"(train.batch_size x ray.num_workers); add data, data.repeat or lower them")
    return batches


# --- cache ------------------------------------------------------------------------------------

def unique_rows(rows: list[dict]) -> list[dict]:
    """One row per metadata record (undo `data.repeat`), in file order."""
    seen = {}
    for r in rows:
        seen.setdefault(r["_row"], r)
    return [seen[k] for k in sorted(seen)]


def cache_identity(cfg: RaydiffConfig, rows: list[dict], shard_rows: int = SHARD_ROWS) -> dict:
    """What a cache depends on: the model (path, a fingerprint of its files except the trainable ones),
    the preprocessing settings and a content hash of the inputs (metadata bytes, each file's size and
    mtime). `data.repeat`, `shuffle` and the seed (unless flipping) only change the reading."""
    m, d = cfg.model, cfg.data
    settings = {"format": FORMAT, "shard_rows": shard_rows, "data_file_keys": d.data_file_keys,
                "height": d.height, "width": d.width, "max_pixels": d.max_pixels,
                "division_factor": d.division_factor, "buckets": d.buckets, "random_flip": d.random_flip,
                "max_image_pixels": d.max_image_pixels, "skip_bad_samples": d.skip_bad_samples,
                "encoded_without": trainable_names(cfg)}
    if any(k in VIDEO_KEYS for k in d.data_file_keys):
        settings["num_frames"] = d.num_frames
    if d.random_flip:
        settings["flip_seed"] = cfg.train.seed
    model = {"family": m.family, "path": m.path, "revision": m.revision, "dtype": m.dtype,
             "max_sequence_length": m.max_sequence_length, "files": _model_fingerprint(cfg)}
    return {"model": model, "settings": settings, "inputs": {"metadata_path": d.metadata_path,
                                                              "hash": _inputs_hash(cfg, rows)}}


def _model_fingerprint(cfg: RaydiffConfig) -> str | None:
    """Sizes and mtimes of the model's files, except the trainable models' folders (training them
    does not change what the encoders produce). None for a hub id (its revision names it)."""
    root = cfg.model.path
    if not os.path.isdir(root):
        return None
    skip = set(trainable_names(cfg))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in skip:
            continue
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.join(rel, name)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _inputs_hash(cfg: RaydiffConfig, rows: list[dict]) -> str:
    h = hashlib.sha256()
    with open(cfg.data.metadata_path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    for r in unique_rows(rows):
        for key in cfg.data.data_file_keys:
            h.update(f"{r['_row']}|{r[key]}|{_file_stamp(r[key])}\n".encode())
    return h.hexdigest()


def _file_stamp(path: str) -> str:
    if is_url(path):
        return "url"
    try:
        if os.path.isdir(path):
            return ";".join(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}"
                            for e in sorted(os.scandir(path), key=lambda e: e.name))
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def describe_changes(old: dict, new: dict) -> str:
    """'model.path: a -> b; settings.max_pixels: 1024 -> 4096' for the keys that differ."""
    changes = []
    for section in ("model", "settings", "inputs"):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                if key in ("hash", "files"):
                    what = "the data files or metadata changed" if section == "inputs" else "its files changed"
                    changes.append(f"{section}: {what}")
                else:
                    changes.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return "; ".join(changes) or "unknown"


def preprocess(cfg: RaydiffConfig, rows: list[dict] | None = None, *, shard_rows: int = SHARD_ROWS) -> str:
    """Encode every sample once into `data.cache_dir` (parquet shards + manifest.json); returns the
    cache dir. A complete cache with the same identity is left alone; a partial one resumes; a stale
    one (other model, settings or inputs) is rebuilt after saying what changed. Needs a running Ray
    (ray.data starts a local one otherwise)."""
    from raydiff.data.dataset import train_and_eval_rows

    d = cfg.data
    if not d.cache_dir:
        raise ValueError("preprocess needs data.cache_dir")
    # The rows `raydiff train` trains on (eval holdout excluded), so the two agree on the cache.
    rows = unique_rows(rows if rows is not None else train_and_eval_rows(d, cfg.eval)[0])
    layout = CacheLayout(d.cache_dir)
    identity = cache_identity(cfg, rows, shard_rows)
    manifest = layout.read_manifest()
    if manifest is not None:
        same = {k: manifest.get(k) for k in identity} == identity
        if same and manifest.get("complete"):
            say(f"[raydiff] cache {d.cache_dir} is complete and current ({manifest.get('num_samples')} samples)")
            return d.cache_dir
        if not same:
            say(f"[raydiff] cache {d.cache_dir} is stale ({describe_changes(manifest, identity)}); re-encoding")
            layout.clear()
        else:
            say(f"[raydiff] resuming the incomplete cache {d.cache_dir}")
    layout.write_manifest({**identity, "complete": False})

    sizes = None
    if d.buckets:
        sizes, _ = row_buckets(d, rows)  # bad headers are skipped (or raise) here
        rows = [r for r in rows if r["_row"] in sizes]
    shards = [rows[i:i + shard_rows] for i in range(0, len(rows), shard_rows)] if rows else []
    missing = [k for k in range(len(shards)) if not layout.exists(layout.shard(k))]
    if missing:
        ray.data.DataContext.get_current().enable_progress_bars = False
        items = [{"shard": k, "rows": json.dumps([{**r, "_size": list(sizes[r["_row"]]) if sizes else None}
                                                  for r in shards[k]])} for k in missing]
        say(f"[raydiff] encoding {sum(len(shards[k]) for k in missing)} samples into {len(missing)} cache shards")
        ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWriter, fn_constructor_args=(to_dict(cfg),), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(d.encoder_actors, len(missing))),
            num_gpus=d.encoder_num_gpus, num_cpus=d.encoder_num_cpus).materialize()
    if not layout.exists(layout.empty_prompt()):
        empty = ray.get(ray.remote(encode_empty_prompt).options(
            num_cpus=d.encoder_num_cpus, num_gpus=d.encoder_num_gpus).remote(to_dict(cfg)))
        write_empty_prompt(layout, empty)
    counts, skipped = layout.shard_stats(len(shards))
    layout.write_manifest({**identity, "complete": True, "shards": counts, "num_samples": sum(counts),
                           "skipped": skipped})
    say(f"[raydiff] cache complete: {sum(counts)} samples in {d.cache_dir}")
    return d.cache_dir


def _cache_data(cfg: RaydiffConfig, rows: list[dict], seed: int) -> TrainData:
    """Train from the cache (building or refreshing it first when needed), repeated `data.repeat`
    times, in `_key` order — or packed into the same bucket batches the other modes form."""
    d, t = cfg.data, cfg.train
    preprocess(cfg, rows)
    layout = CacheLayout(d.cache_dir)
    manifest = layout.read_manifest()
    files = [layout.shard(k) for k, n in enumerate(manifest["shards"]) if n]
    if not files:
        raise ValueError(f"the cache {d.cache_dir} holds no samples")
    cached = layout.index(files)  # [(_row, (h, w))] of every cached sample
    repeated = [{"_row": r} for r, _ in cached] * d.repeat
    ordered = order_rows(sorted(repeated, key=lambda r: r["_row"]), seed, d.shuffle)
    ds = ray.data.read_parquet([layout.uri(f) for f in files], filesystem=layout.fs)
    ds = ds.map_batches(decode_shard_batch, batch_format="pyarrow", zero_copy_batch=True)
    empty = read_empty_prompt(layout) if d.caption_dropout > 0 else None
    if not d.buckets:
        # Sort into the order inline mode trains in. The driver knows every key, so it hands the sort
        # its partition boundaries: no sampling pass, and ~4096 rows a partition instead of 200 partitions.
        parts = max(2, min(200, len(ordered) // 4096))
        bounds = [ordered[i * len(ordered) // parts]["_key"] for i in range(1, parts)]
        ds = ds.flat_map(RepeatCached(d.repeat, seed, d.shuffle)).sort("_key", boundaries=bounds)
        return TrainData(ds, len(ordered), empty_prompt=empty)
    sizes = {r: tuple(size) for r, size in cached}
    batches = _bucket_batches(cfg, ordered, sizes)
    slots = {(r["_row"], r["_rep"]): (b, i) for b, batch in enumerate(batches) for i, r in enumerate(batch)}
    # Two shuffles (group, then order the batches), each with about one partition per 64 batches.
    parts = max(2, min(200, len(batches) // 64))
    ds = ds.flat_map(RepeatCached(d.repeat, seed, d.shuffle, slots)).groupby("_batch", num_partitions=parts)
    ds = ds.map_groups(pack_group, batch_format="numpy")
    ds = ds.sort("_batch", boundaries=[i * len(batches) // parts for i in range(1, parts)])
    return TrainData(ds, len(batches) * t.batch_size, True, len(batches), empty)
