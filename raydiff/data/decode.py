"""The decode stage (Ray Data `flat_map`): one metadata row -> one decoded, resized, maybe flipped uint8
sample; one planned bucket batch -> one packed row holding the batch.

Bad samples raise `SampleError` naming row and file, or with `data.skip_bad_samples` are dropped and
counted by the run's `SkipCounter` actor. Kept free of torch so decode tasks start fast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import ray

from raydiff.config import DataConfig
from raydiff.data.metadata import BadSample, SampleError, is_url
from raydiff.data.operators import DecodeError, load_image, load_video, resize_image, resize_video, target_size
from raydiff.data.packing import pack_samples
from raydiff.data.plan import flipped
from raydiff.registry import EDIT_IMAGE

log = logging.getLogger(__name__)
VIDEO_KEYS = ("video", "control_video", "mask_video")
IMAGE_LIST_KEYS = ("reference_images",)  # a list of image paths (or one), decoded to (N, H, W, 3)
# Edit sources (a path or a list): decoded to (N, H, W, 3) at the first file's own size, whatever the target's size
# (fixed, bucket or max_pixels), later files of the row resized to it; the family resizes them by its pipeline's
# rule, as the pipeline does at inference (raydiff.pipelines.edit). Batches may mix their sizes (collate).
NATIVE_KEYS = (EDIT_IMAGE,)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Counts distinct skipped metadata rows across every decode task of a run."""

    def __init__(self):
        self.reasons: dict[int, str] = {}

    def add(self, row: int, reason: str) -> None:
        self.reasons.setdefault(row, reason)

    def count(self) -> int:
        return len(self.reasons)


def skip_counter_name(run_name: str) -> str:
    return f"raydiff-skips-{run_name}"


def skip_counter(run_name: str):
    """The run's counter, detached so it outlives the driver-side handle while Ray Data tasks (owned by
    the training workers) report into it; `launch_training_task` kills it when the run ends."""
    return SkipCounter.options(name=skip_counter_name(run_name), get_if_exists=True, lifetime="detached").remote()


def count_skipped(counter_name: str | None, bad: BadSample) -> None:
    """Log a skipped sample and count it in the run's counter (if any)."""
    count_skipped_rows(counter_name, [bad])


def count_skipped_rows(counter_name: str | None, bad: list[BadSample]) -> None:
    """`count_skipped` for many rows (those refused before the decode stage: a bucket's header read, a
    cache's manifest), in one round trip."""
    for b in bad:
        log.warning("skipping %s", b)
    if counter_name and bad:
        actor = ray.get_actor(counter_name)
        # Synchronous: a later count() must see them (calls from different tasks are unordered).
        ray.get([actor.add.remote(b.row, b.reason) for b in bad])


def skipped_samples(counter_name: str | None) -> int:
    """Distinct rows the run's counter has seen skipped (0 without a counter)."""
    if not counter_name:
        return 0
    return ray.get(ray.get_actor(counter_name).count.remote())


def read_url(uri: str) -> bytes:
    """The bytes of a remote file (s3://..., with the AWS SDK's settings)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as err:
        raise DecodeError(f"cannot read {uri}: {err}") from None


@dataclass
class DecodeSample:
    """Ray Data `flat_map` function: one metadata row -> [sample] or [] (skipped and counted).
    `frames`: the row's frame bucket, which every video column must fill (data.frame_buckets)."""

    cfg: DataConfig
    counter_name: str | None = None
    frames: int | None = None

    def __call__(self, row: dict) -> list[dict]:
        out = {"prompt": row["prompt"], "_row": row["_row"]}
        size = None  # the first key's (h, w): a sample's conditions take its size, so they line up with it
        for key in self.cfg.data_file_keys:
            try:
                out[key] = self.load(key, row[key], size)
                size = size or out[key].shape[-3:-1]
            except DecodeError as err:
                source = row[key] if isinstance(row[key], str) else row.get("_source", "embedded bytes")
                bad = BadSample(row["_row"], source, f"{err} (column {key!r})")
                if not self.cfg.skip_bad_samples:
                    raise SampleError(bad) from None
                count_skipped(self.counter_name, bad)
                return []
        return [out]

    def load(self, key: str, path: str | bytes | list, size: tuple[int, int] | None = None) -> np.ndarray:
        """One file column of a row, uint8: (H, W, 3), (F, H, W, 3) for VIDEO_KEYS, (N, H, W, 3) for
        IMAGE_LIST_KEYS and NATIVE_KEYS; at data.height/width, else `size`, else sized from the file
        (data.max_pixels); NATIVE_KEYS at their first file's size. A file is a local path, a URL (read through
        pyarrow's filesystems) or its bytes."""
        cfg = self.cfg
        fixed = (cfg.height, cfg.width) if cfg.height else size
        if key in IMAGE_LIST_KEYS or key in NATIVE_KEYS:
            paths = [path] if isinstance(path, (str, bytes)) else list(path)
            if key in NATIVE_KEYS:
                first = self.read_image(paths[0])
                return np.stack([first, *(resize_image(self.read_image(p), first.shape[:2]) for p in paths[1:])])
            first = self.load("image", paths[0], fixed)
            return np.stack([first, *(self.load("image", p, first.shape[:2]) for p in paths[1:])])
        if key in VIDEO_KEYS:
            frames = load_video(read_url(path) if isinstance(path, str) and is_url(path) else path,
                                num_frames=cfg.num_frames, max_pixels_before_decode=cfg.max_image_pixels)
            if self.frames and len(frames) < self.frames:  # a header that over-counts, or a short condition
                raise DecodeError(f"decoded {len(frames)} usable (4k + 1) frames, fewer than the {self.frames} of "
                                  f"its frame bucket (data.frame_buckets)")
            size = target_size(*frames.shape[1:3], fixed=fixed, max_pixels=cfg.max_pixels,
                               division_factor=cfg.division_factor)
            return resize_video(frames, size)
        image = self.read_image(path)
        size = target_size(*image.shape[:2], fixed=fixed, max_pixels=cfg.max_pixels,
                           division_factor=cfg.division_factor)
        return resize_image(image, size)

    def read_image(self, path: str | bytes) -> np.ndarray:
        """An image file (path, URL or bytes) at its own size, uint8 (H, W, 3)."""
        if isinstance(path, str) and is_url(path):
            path = read_url(path)
        return load_image(path, max_pixels_before_decode=self.cfg.max_image_pixels)


@dataclass
class DecodeRow:
    """Ray Data `flat_map`: the decode stage with buckets and flips.

    A plain row decodes as `DecodeSample` (to its bucket's `_size` when it has one: [h, w], or
    [frames, h, w] with `data.frame_buckets`), flipped if `data.random_flip` picks it, keeping `_rep`
    and `_key`. A packed row (`_rows`: a JSON list of rows, one bucket batch) becomes one row holding
    the whole batch: media (B, H, W, 3) or (B, F, H, W, 3), prompt, `_row`, `_rep` as lists and
    `_packed` = B.
    """

    cfg: DataConfig
    seed: int = 0
    counter_name: str | None = None

    def __call__(self, row: dict) -> list[dict]:
        if "_rows" not in row:
            return self.decode(row)
        samples = [s for member in json.loads(row["_rows"]) for s in self.decode(member)]
        if not samples:  # dropping the row would leave this worker a batch short of the others
            raise ValueError(f"every sample of bucket batch {row['_batch']} is bad")
        return [pack_samples(samples, row["_batch"])]

    def decode(self, row: dict) -> list[dict]:
        cfg, frames = self.cfg, None
        if row.get("_size") is not None:
            bucket = [int(x) for x in row["_size"]]
            frames = bucket[0] if len(bucket) == 3 else None
            cfg = cfg.model_copy(update={"height": bucket[-2], "width": bucket[-1],
                                         "num_frames": frames or cfg.num_frames})
        out = DecodeSample(cfg, self.counter_name, frames)(row)
        for sample in out:  # the row's annotations (_rep, _key; a stream's _pass, _index) travel on
            sample.update({k: v for k, v in row.items() if k.startswith("_") and k not in ("_size", "_row")})
            if self.cfg.random_flip and flipped(self.seed, row["_row"]):
                for key in self.cfg.data_file_keys:  # the width axis of (..., H, W, 3)
                    sample[key] = np.ascontiguousarray(np.flip(sample[key], axis=-2))
        return out
