"""The training dataset as a Ray Data pipeline: metadata rows -> decoded, resized uint8 samples.

Metadata is read (and paths checked) in the driver, so a typo fails before any worker starts.
Decoding and resizing run in Ray Data tasks with their own CPU budget; training workers pull
their shard with `ray.train.get_dataset_shard("train")` and only convert to tensors.
"""

from __future__ import annotations

import logging

import ray

from raydiff.config import DataConfig
from raydiff.data.decode import DecodeSample
from raydiff.data.metadata import BadSample, SampleError, read_metadata

log = logging.getLogger(__name__)


def read_rows(cfg: DataConfig) -> tuple[list[dict], list[BadSample]]:
    """Metadata rows (repeated `cfg.repeat` times) and the rows refused before decoding.
    With `skip_bad_samples: false` the first refused row raises `SampleError`."""
    rows, bad = read_metadata(cfg.metadata_path, base_path=cfg.base_path, data_file_keys=cfg.data_file_keys,
                              allow_outside_base=cfg.allow_outside_base)
    if bad and not cfg.skip_bad_samples:
        first, more = bad[0], len(bad) - 1
        hint = f" ({more} more bad rows)" if more else ""
        raise SampleError(BadSample(first.row, first.file, f"{first.reason}{hint}; data.skip_bad_samples: true skips them"))
    for b in bad:
        log.warning("skipping %s", b)
    keep = ["prompt", "_row", *cfg.data_file_keys]
    rows = [{k: r[k] for k in keep} for r in rows] * cfg.repeat
    if not rows:
        raise ValueError(f"{cfg.metadata_path}: no usable samples")
    return rows, bad


def build_dataset(cfg: DataConfig, rows: list[dict], *, seed: int, counter_name: str | None = None) -> ray.data.Dataset:
    """A lazy Ray Data pipeline of decoded samples: {key: uint8 (H, W, 3) or (F, H, W, 3), prompt, _row}."""
    # Blocks of ~64 rows: enough tasks to keep decoders busy, few enough that task overhead stays small.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(8, len(rows) // 64)))
    if cfg.shuffle:
        ds = ds.random_shuffle(seed=seed)
    return ds.flat_map(DecodeSample(cfg, counter_name), num_cpus=cfg.num_cpus)
