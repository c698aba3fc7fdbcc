"""The eval set: the eval rows decoded (and in stream/cache mode encoded) once per run by one Ray task, which
every rank `ray.get`s (raydiff.training.evaluation.EvalSet scores its share). In cache mode the encoded set is
kept in the cache (`eval_set.parquet`), so later runs, and every run after `raydiff preprocess`, load no
encoder for it."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from raydiff.config import RaydiffConfig, from_remote, to_remote
from raydiff.console import quiet_libraries
from raydiff.data.decode import DecodeRow
from raydiff.data.encode import encoder_task_options


@dataclass
class EvalRefs:
    """What `start_eval_set` started: the eval samples, and the empty prompt's encoded columns when asked for."""

    samples: ray.ObjectRef
    empty_prompt: ray.ObjectRef | None = None


def start_eval_set(cfg: RaydiffConfig, rows: list[dict], counter_name: str | None = None,
                   empty_prompt: bool = False) -> EvalRefs:
    """The eval set (`eval_samples`) made by one Ray task that starts now, so it overlaps the run's start;
    every rank `ray.get`s the list and scores its share. One task for the run, not a pipeline per rank: in
    stream/cache mode each rank would otherwise start its own encoder and encode the whole set.
    `empty_prompt` (stream mode with caption dropout): the same task, with the encoder it loads anyway, also
    encodes the empty prompt, rather than a second task loading the text encoders again.
    Encoders on GPUs finish before this returns, so that the workers' GPUs are not held up."""
    d = cfg.data
    identity = None
    if d.preprocess == "cache":
        from raydiff.data.cache import eval_identity
        from raydiff.data.cache_io import CacheLayout, read_eval_set

        identity = eval_identity(cfg, rows)
        cached = read_eval_set(CacheLayout(d.cache_dir), identity)
        if cached is not None:
            return EvalRefs(ray.put(cached))
    if d.preprocess == "inline":
        options = {"num_cpus": d.num_cpus, "scheduling_strategy": "DEFAULT"}  # DEFAULT: see encoder_task_options
    else:
        options = encoder_task_options(cfg)
    samples, empty = ray.remote(eval_samples).options(**options, num_returns=2).remote(
        to_remote(cfg), rows, counter_name, empty_prompt, identity)
    if d.preprocess != "inline" and d.encoder_num_gpus > 0:
        ray.wait([samples, empty], num_returns=2, fetch_local=False)
    return EvalRefs(samples, empty if empty_prompt else None)


def eval_samples(config: dict, rows: list[dict], counter_name: str | None = None, empty_prompt: bool = False,
                 cache_identity: dict | None = None) -> tuple[list[dict], dict | None]:
    """(the eval samples in file order, decoded without flips; in stream/cache mode also encoded (those
    workers hold no encoders), `data.encoder_batch_size` at a time; with `empty_prompt`, the empty prompt's
    encoded columns, else None). With `cache_identity` (cache mode) the encoded samples are also written to
    the cache, stamped with it, unless a row was skipped as a bad sample."""
    cfg = from_remote(config)
    d = cfg.data.model_copy(update={"random_flip": False})
    samples = [sample for row in rows for sample in DecodeRow(d, 0, counter_name)(row)]
    if d.preprocess == "inline" or not (samples or empty_prompt):
        return samples, None
    from raydiff.data.encoder import Encoder  # here: an inline eval task only decodes, and imports no torch

    quiet_libraries()
    encoder, encoded = Encoder(cfg), []
    for start in range(0, len(samples), d.encoder_batch_size):
        chunk = samples[start:start + d.encoder_batch_size]
        columns = encoder.encode({key: [s[key] for s in chunk] for key in chunk[0]})
        encoded += [{key: column[i] for key, column in columns.items()} for i in range(len(chunk))]
    if cache_identity is not None and encoded and len(encoded) == len(rows):  # a skipped row is counted each run
        from raydiff.data.cache_io import CacheLayout, write_eval_set

        write_eval_set(CacheLayout(cfg.data.cache_dir), encoded, cache_identity)
    return encoded, (encoder.empty_prompt() if empty_prompt else None)
