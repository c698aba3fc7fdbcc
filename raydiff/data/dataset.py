"""The training dataset as a Ray Data pipeline: metadata rows -> decoded, resized uint8 samples.

Metadata is read (and paths checked) in the driver, so a typo fails before any worker starts.
Decoding and resizing run in Ray Data tasks with their own CPU budget; training workers pull
their shard with `ray.train.get_dataset_shard("train")` and only convert to tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray
import torch

from raydiff.config import DataConfig
from raydiff.data.metadata import BadSample, SampleError, read_metadata
from raydiff.data.operators import DecodeError, load_image, load_video, resize_image, resize_video, target_size

log = logging.getLogger(__name__)
VIDEO_KEYS = ("video",)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Counts distinct skipped metadata rows across every decode task of a run."""

    def __init__(self):
        self.reasons: dict[int, str] = {}

    def add(self, row: int, reason: str) -> None:
        self.reasons.setdefault(row, reason)

    def count(self) -> int:
        return len(self.reasons)


def skip_counter(run_name: str):
    return SkipCounter.options(name=f"raydiff-skips-{run_name}", get_if_exists=True).remote()


@dataclass
class DecodeSample:
    """Ray Data `flat_map` function: one metadata row -> [sample] or [] (skipped and counted)."""

    cfg: DataConfig
    counter_name: str | None = None

    def __call__(self, row: dict) -> list[dict]:
        out = {"prompt": row["prompt"], "_row": row["_row"]}
        for key in self.cfg.data_file_keys:
            try:
                out[key] = self.load(key, row[key])
            except DecodeError as err:
                bad = BadSample(row["_row"], row[key], str(err))
                if not self.cfg.skip_bad_samples:
                    raise SampleError(bad) from None
                log.warning("skipping %s", bad)
                if self.counter_name:
                    ray.get_actor(self.counter_name).add.remote(bad.row, bad.reason)
                return []
        return [out]

    def load(self, key: str, path: str) -> np.ndarray:
        cfg = self.cfg
        fixed = (cfg.height, cfg.width) if cfg.height else None
        if key in VIDEO_KEYS:
            frames = load_video(path, num_frames=cfg.num_frames, max_pixels_before_decode=cfg.max_image_pixels)
            size = target_size(*frames.shape[1:3], fixed=fixed, max_pixels=cfg.max_pixels,
                               division_factor=cfg.division_factor)
            return resize_video(frames, size)
        image = load_image(path, max_pixels_before_decode=cfg.max_image_pixels)
        size = target_size(*image.shape[:2], fixed=fixed, max_pixels=cfg.max_pixels,
                           division_factor=cfg.division_factor)
        return resize_image(image, size)


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
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
    if cfg.shuffle:
        ds = ds.random_shuffle(seed=seed)
    return ds.flat_map(DecodeSample(cfg, counter_name), num_cpus=cfg.num_cpus)


def collate(batch: dict, device: torch.device, data_file_keys=("image",)) -> dict:
    """A numpy batch from Ray Data -> model inputs: media as float (B, 3, H, W) or (B, 3, F, H, W)
    in [-1, 1], prompts as a list of str."""
    out = {"prompt": [str(p) for p in batch["prompt"]]}
    for key in data_file_keys:
        arr = batch[key]
        if arr.dtype == object:  # ragged: a batch mixing sizes (needs buckets; see data.height/width)
            shapes = {a.shape for a in arr}
            if len(shapes) > 1:
                raise ValueError(f"a batch mixes {key} sizes {sorted(shapes)}; set data.height/width or batch_size 1")
            arr = np.stack(list(arr))
        x = torch.from_numpy(np.array(arr)).to(device, non_blocking=True)  # copy: Arrow buffers are read-only
        x = x.movedim(-1, 1).float().div_(127.5).sub_(1.0)  # (B, ..., 3) -> (B, 3, ...)
        out[key] = x
    return out
