"""The training dataset as a Ray Data pipeline: metadata rows -> decoded, resized uint8 samples.

Metadata is read (and paths checked) in the driver, so a typo fails before any worker starts.
Decoding and resizing run in Ray Data tasks with their own CPU budget; training workers pull
their shard with `ray.train.get_dataset_shard("train")` and only convert to tensors.
"""

from __future__ import annotations

import logging

import ray

from raydiff.config import DataConfig
from raydiff.data.metadata import BadSample, SampleError, read_metadata
from raydiff.data.plan import DecodeRow

log = logging.getLogger(__name__)


def read_rows(cfg: DataConfig, metadata_path: str | None = None, repeat: int | None = None
              ) -> tuple[list[dict], list[BadSample]]:
    """Metadata rows (repeated `cfg.repeat` times) and the rows refused before decoding.
    With `skip_bad_samples: false` the first refused row raises `SampleError`."""
    metadata_path = metadata_path or cfg.metadata_path
    rows, bad = read_metadata(metadata_path, base_path=cfg.base_path, data_file_keys=cfg.data_file_keys,
                              allow_outside_base=cfg.allow_outside_base)
    if bad and not cfg.skip_bad_samples:
        first, more = bad[0], len(bad) - 1
        hint = f" ({more} more bad rows)" if more else ""
        raise SampleError(BadSample(first.row, first.file, f"{first.reason}{hint}; data.skip_bad_samples: true skips them"))
    for b in bad:
        log.warning("skipping %s", b)
    keep = ["prompt", "_row", *cfg.data_file_keys]
    rows = [{k: r[k] for k in keep} for r in rows] * (cfg.repeat if repeat is None else repeat)
    if not rows:
        raise ValueError(f"{metadata_path}: no usable samples")
    return rows, bad


def train_and_eval_rows(data: DataConfig, eval_cfg) -> tuple[list[dict], list[dict], list[BadSample]]:
    """(training rows, eval rows, bad rows). Eval rows come from `eval.metadata_path`, or are the last
    `eval.holdout` metadata rows, which then never reach training."""
    if eval_cfg.metadata_path:
        train, bad = read_rows(data)
        held, bad_eval = read_rows(data, eval_cfg.metadata_path, repeat=1)
        return train, held, bad + bad_eval
    rows, bad = read_rows(data, repeat=1)
    if eval_cfg.holdout >= len(rows):
        raise ValueError(f"eval.holdout {eval_cfg.holdout} leaves no training rows out of {len(rows)}")
    cut = len(rows) - eval_cfg.holdout
    return rows[:cut] * data.repeat, rows[cut:], bad


def build_dataset(cfg: DataConfig, rows: list[dict], *, seed: int, counter_name: str | None = None) -> ray.data.Dataset:
    """Rows (or bucket batches, see raydiff.data.plan) -> a lazy Ray Data pipeline of decoded samples
    {key: uint8 (H, W, 3) or (F, H, W, 3), prompt, _row, ...} in the order given; `seed` picks the flips."""
    # Blocks of ~64 rows: enough tasks to keep decoders busy, few enough that task overhead stays small.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), max(8, len(rows) // 64))))
    return ds.flat_map(DecodeRow(cfg, seed, counter_name), num_cpus=cfg.num_cpus)
