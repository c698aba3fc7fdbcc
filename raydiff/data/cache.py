"""The encoded-sample cache (`data.preprocess: cache`): what it depends on, and writing it.

The cache is a directory (local or s3://) of parquet shards, one per `SHARD_ROWS` metadata rows in
file order, named by index, each written to a temp name and renamed when complete: an interrupted
run resumes with the missing shards, a complete one is a no-op. Tensors are raw bytes + shape +
dtype columns (no pickle, raydiff.data.cache_io). `manifest.json` names the model, the preprocessing
settings and a hash of the inputs; any difference rebuilds the cache and says what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from raydiff.config import RaydiffConfig, from_remote
from raydiff.config.libraries import hide_unused_libraries
from raydiff.console import quiet_libraries, say
from raydiff.data.buckets import row_buckets
from raydiff.data.cache_io import CacheLayout, write_empty_prompt, write_encoded
from raydiff.data.components import trainable_names, worker_models
from raydiff.data.decode import VIDEO_KEYS, DecodeRow
from raydiff.data.encode import run_encoder_actors, start_empty_prompt
from raydiff.data.metadata import SampleError, family_max_paths, is_url, train_and_eval_rows

FORMAT = 1
SHARD_ROWS = 256


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
    settings = {"format": FORMAT, "shard_rows": shard_rows, **cache_settings(cfg)}
    return {"model": model_identity(cfg), "settings": settings,
            "inputs": {"metadata_path": cfg.data.metadata_path, "hash": _inputs_hash(cfg, rows)}}


def eval_identity(cfg: RaydiffConfig, rows: list[dict]) -> dict:
    """What an encoded eval set depends on: the model, the preprocessing settings (eval samples are never
    flipped) and the eval rows themselves (their prompts, files and each file's size and mtime)."""
    settings = {"format": FORMAT, **cache_settings(cfg), "random_flip": False}
    settings.pop("flip_seed", None)
    h = hashlib.sha256()
    for r in rows:
        fields = {k: v for k, v in r.items() if not k.startswith("_")}  # the prompt and the file paths
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        for key in cfg.data.data_file_keys:
            h.update(f"{r['_row']}|{_file_stamp(r[key])}\n".encode())
    return {"model": model_identity(cfg), "settings": settings, "rows": h.hexdigest()}


def cache_settings(cfg: RaydiffConfig) -> dict:
    """The preprocessing settings encoded samples depend on."""
    d = cfg.data
    settings = {"data_file_keys": d.data_file_keys, "height": d.height, "width": d.width,
                "max_pixels": d.max_pixels, "division_factor": d.division_factor, "buckets": d.buckets,
                "random_flip": d.random_flip, "max_image_pixels": d.max_image_pixels,
                "skip_bad_samples": d.skip_bad_samples, "encoded_without": worker_models(cfg)}
    if any(k in VIDEO_KEYS for k in d.data_file_keys):
        settings["num_frames"] = d.num_frames
    if d.frame_buckets:  # absent otherwise, so caches written before frame buckets stay current
        settings["frame_buckets"] = d.frame_buckets
    if d.random_flip:
        settings["flip_seed"] = cfg.train.seed
    return settings


def model_identity(cfg: RaydiffConfig) -> dict:
    """The model encoded samples depend on: path, revision, dtype, text length, a fingerprint of its files."""
    m = cfg.model
    model = {"family": m.family, "path": m.path, "revision": m.revision, "dtype": m.dtype,
             "max_sequence_length": m.max_sequence_length, "files": _model_fingerprint(cfg)}
    if m.quantize_text_encoders:  # quantized encoders give other embeddings (absent otherwise: old caches stay valid)
        model["quantize_text_encoders"] = m.quantize
    if m.controlnet is not None:  # its config can change how control images encode (SD3's shift); absent otherwise
        model["controlnet"] = m.controlnet.model_dump()
    return model


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


def _file_stamp(path: str | list[str]) -> str:
    if isinstance(path, (list, tuple)):
        return "+".join(_file_stamp(p) for p in path)
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
    one (other model, settings or inputs) is rebuilt after saying what changed. `rows`: from
    `train_and_eval_rows`, read here when not given. The encoders run in Ray actors (a local Ray starts if
    none runs)."""
    d = cfg.data
    if not d.cache_dir:
        raise ValueError("preprocess needs data.cache_dir")
    # The rows `raydiff train` trains on (eval holdout excluded), so the two agree on the cache.
    rows = unique_rows(rows if rows is not None else train_and_eval_rows(d, cfg.eval, family_max_paths(cfg))[0])
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

    sizes, unread = None, []
    if d.buckets:
        sizes, unread = row_buckets(d, rows)  # bad headers (and short clips) are skipped (or raise) here
        rows = [r for r in rows if r["_row"] in sizes]
    shards = [rows[i:i + shard_rows] for i in range(0, len(rows), shard_rows)] if rows else []
    missing = [k for k in range(len(shards)) if not layout.exists(layout.shard(k))]
    if missing:
        # The first shard's writer also encodes the empty prompt: no second process loads the encoders.
        empty = not layout.exists(layout.empty_prompt())
        items = [{"shard": k, "rows": json.dumps([{**r, "_size": list(sizes[r["_row"]]) if sizes else None}
                                                  for r in shards[k]]), "empty_prompt": empty and k == missing[0]}
                 for k in missing]
        say(f"[raydiff] encoding {sum(len(shards[k]) for k in missing)} samples into {len(missing)} cache shards")
        run_encoder_actors(ShardWriter, cfg, items)
    if not layout.exists(layout.empty_prompt()):
        write_empty_prompt(layout, ray.get(start_empty_prompt(cfg)))
    counts, skipped = layout.shard_stats(len(shards))
    skipped = [{"row": b.row, "file": b.file, "reason": b.reason} for b in unread] + skipped
    layout.write_manifest({**identity, "complete": True, "shards": counts, "num_samples": sum(counts),
                           "skipped": skipped})
    say(f"[raydiff] cache complete: {sum(counts)} samples in {d.cache_dir}")
    return d.cache_dir


class ShardWriter:
    """The actor class of `preprocess` (raydiff.data.encode.run_encoder_actors): each item is one shard
    (its metadata rows as JSON); the actor decodes them (threads), encodes them in batches of
    `data.encoder_batch_size` and writes the shard (and the empty prompt, when the item says so)."""

    def __init__(self, config: dict):
        cfg = from_remote(config)
        hide_unused_libraries(cfg)  # an actor serves one run
        quiet_libraries()
        from raydiff.data.encoder import Encoder  # here: the driver imports this module, and no torch

        self.cfg, self.encoder = cfg, Encoder(cfg)
        strict = cfg.data.model_copy(update={"skip_bad_samples": False})  # we record the reason ourselves
        self.decode = DecodeRow(strict, cfg.train.seed)
        self.layout = CacheLayout(cfg.data.cache_dir)
        self.threads = ThreadPoolExecutor(max_workers=4)

    def _decode(self, row: dict):
        try:
            return self.decode(row)
        except SampleError as err:
            if not self.cfg.data.skip_bad_samples:
                raise
            return err.bad

    def write(self, item: dict) -> None:
        """item: {"shard": index, "rows": JSON list of metadata rows, "empty_prompt": bool}."""
        media = self.cfg.data.data_file_keys[0]
        # The bucket each sample was decoded to, for the cache index: (h, w), or (frames, h, w) of a clip
        # with data.frame_buckets.
        dims = 3 if self.cfg.data.frame_buckets else 2
        if item["empty_prompt"]:
            write_empty_prompt(self.layout, self.encoder.empty_prompt())
        samples, skipped = [], []
        for result in self.threads.map(self._decode, json.loads(item["rows"])):
            if isinstance(result, list):
                samples += result
            else:
                skipped.append({"row": result.row, "file": result.file, "reason": result.reason})
        write_encoded(self.layout, self.layout.shard(item["shard"]), self.encoder, samples, skipped,
                      self.cfg.data.encoder_batch_size,
                      extra=lambda chunk: {"_size": [list(np.shape(s[media])[-1 - dims:-1]) for s in chunk]})
