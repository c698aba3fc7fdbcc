"""Ray Data stage functions: one metadata row -> one decoded, resized uint8 sample.

Kept free of torch so the decode tasks' worker processes start fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray

from raydiff.config import DataConfig
from raydiff.data.metadata import BadSample, SampleError
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
    """The run's counter, detached so it outlives the driver-side handle while Ray Data tasks (owned by
    the training workers) report into it; `launch_training_task` kills it when the run ends."""
    return SkipCounter.options(name=f"raydiff-skips-{run_name}", get_if_exists=True, lifetime="detached").remote()


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
                    # Synchronous: a later count() must see it (calls from different tasks are unordered).
                    ray.get(ray.get_actor(self.counter_name).add.remote(bad.row, bad.reason))
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
