"""Aspect-ratio buckets: batches > 1 from a dataset of mixed image sizes (and, with `data.frame_buckets`,
of mixed clip lengths).

Planned in the driver, before any pixel is decoded: image sizes and clip lengths come from file headers,
each sample goes to the bucket whose aspect ratio is closest to its own (a clip also to the longest frame
bucket it fills), batches are cut within one bucket (remainders dropped) and shuffled as whole batches.
Each batch then travels as one Ray Data row, so Ray's equal split hands every worker whole batches, the
same number of them, and DDP never waits on a rank that ran out.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from raydiff.config import DataConfig
from raydiff.data.metadata import BadSample, SampleError, is_url
from raydiff.data.operators import DecodeError, _image_extensions, frame_names

MIN_RATIO, MAX_RATIO = 1 / 4, 4.0  # height / width, from 1:4 (wide) to 4:1 (tall)
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def bucket_sizes(max_pixels: int, division_factor: int) -> list[tuple[int, int]]:
    """(h, w) sizes with h * w <= max_pixels, both sides multiples of `division_factor`, aspect
    ratios between 1:4 and 4:1; for each side, the other is the largest that fits. Sorted by h / w."""
    df = division_factor
    sizes = set()
    square = math.isqrt(max_pixels) // df * df
    if square >= df:
        sizes.add((square, square))
    side = df
    while side * df <= max_pixels:
        other = max_pixels // side // df * df
        for h, w in ((side, other), (other, side)):
            if MIN_RATIO <= h / w <= MAX_RATIO:
                sizes.add((h, w))
        side += df
    if not sizes:
        raise ValueError(f"data.max_pixels {max_pixels} holds no bucket with sides a multiple of {df}")
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (in log space); ties go to the larger area."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def media_size(path: str) -> tuple[int, int]:
    """(height, width) as decoding will see it (EXIF rotation applied), from headers only.
    A directory is a video of frame images (its first frame); other non-image files are videos."""
    if os.path.isdir(path):
        frames = frame_names(path)
        if not frames:
            raise DecodeError("video has 0 decodable frames (no image files in the directory)")
        return media_size(os.path.join(path, frames[0]))
    if os.path.splitext(path)[1].lower() in _image_extensions():
        try:
            with Image.open(path) as im:
                w, h = im.size
                swap = im.getexif().get(0x0112) in _SWAPS_SIDES
        except (OSError, SyntaxError, ValueError) as e:
            raise DecodeError(f"cannot read image header: {e}") from e
        return (w, h) if swap else (h, w)
    import av

    try:
        with av.open(path) as container:
            ctx = container.streams.video[0].codec_context
            return ctx.height, ctx.width
    except (av.FFmpegError, IndexError, AttributeError) as e:
        raise DecodeError(f"not a video: {e}") from e


def media_frames(path: str) -> int:
    """A clip's frame count, as decoding will see it, without decoding a frame: the image files of a
    directory, 1 for an image (a one-frame video), else the video stream's count from the container."""
    if os.path.isdir(path):
        return len(frame_names(path))
    if os.path.splitext(path)[1].lower() in _image_extensions():
        return 1
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            # Matroska, WebM and raw streams store no frame count (PyAV says 0): count the stream's packets
            # instead. Demuxing reads the file but decodes nothing, and these codecs put one frame in a packet
            # (an empty packet is the demuxer's end-of-stream flush, not a frame).
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, IndexError) as e:
        raise DecodeError(f"not a video: {e}") from e


def frame_bucket(frames: int, frame_buckets: list[int], num_frames: int) -> int:
    """The largest of `frame_buckets` not above the clip's `frames` nor `num_frames` (the most a clip is
    read to); 0 when the clip is shorter than every bucket."""
    return max((b for b in frame_buckets if b <= min(frames, num_frames)), default=0)


def plan_batches(rows: list[dict], sizes: dict[int, tuple[int, ...]], *, batch_size: int,
                 num_workers: int) -> list[list[dict]]:
    """Cut `rows` (already in training order, each with `_row`) into batches of one bucket each.

    `sizes` maps `_row` to its bucket, (h, w) or (frames, h, w). Within a bucket rows keep their order;
    a bucket's remainder (< batch_size rows) is dropped; batches are ordered by their first row's
    position, so a shuffled row order gives a shuffled batch order. The batch count is cut to a multiple
    of `num_workers`. Each row gains `_size` = its bucket as a list.
    """
    by_bucket: dict[tuple[int, ...], list[tuple[int, dict]]] = defaultdict(list)
    for position, r in enumerate(rows):
        size = tuple(sizes[r["_row"]])
        by_bucket[size].append((position, {**r, "_size": list(size)}))
    batches = []
    for members in by_bucket.values():
        for start in range(0, len(members) - batch_size + 1, batch_size):
            batches.append(members[start:start + batch_size])
    batches.sort(key=lambda b: b[0][0])
    batches = batches[: len(batches) // num_workers * num_workers]
    return [[r for _, r in b] for b in batches]


def bucket_batches(rows: list[dict], sizes: dict[int, tuple[int, ...]], *, batch_size: int,
                   num_workers: int) -> list[list[dict]]:
    """`plan_batches`, refusing a plan with no batch at all."""
    batches = plan_batches(rows, sizes, batch_size=batch_size, num_workers=num_workers)
    if not batches:
        raise ValueError(f"no bucket holds {batch_size} x {num_workers} samples "
                         f"(train.batch_size x ray.num_workers); add data, data.repeat or lower them")
    return batches


def row_buckets(cfg: DataConfig, rows: list[dict]) -> tuple[dict[int, tuple[int, ...]], list[BadSample]]:
    """{_row: bucket} for every row whose first data file has a readable header, and the rows without
    one (raised as `SampleError` unless `data.skip_bad_samples`). A bucket is (h, w), or with
    `data.frame_buckets` (frames, h, w), a clip shorter than every frame bucket being a bad row.
    Headers are read in threads."""
    buckets = bucket_sizes(cfg.max_pixels, cfg.division_factor)
    key = cfg.data_file_keys[0]
    paths = {r["_row"]: r[key] for r in rows}
    remote = [p for p in paths.values() if is_url(p)]
    if remote:
        raise ValueError(f"data.buckets reads image sizes from local files; {remote[0]!r} is remote")

    def bucket(path):
        try:
            return _bucket(cfg, path, buckets)
        except DecodeError as err:
            return err

    sizes, bad = {}, []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for (row, path), size in zip(paths.items(), pool.map(bucket, paths.values())):
            if isinstance(size, DecodeError):
                bad.append(BadSample(row, path, str(size)))
            else:
                sizes[row] = size
    if bad and not cfg.skip_bad_samples:
        raise SampleError(bad[0])
    return sizes, bad


def _bucket(cfg: DataConfig, path: str, buckets: list[tuple[int, int]]) -> tuple[int, ...]:
    size = assign_bucket(*media_size(path), buckets)
    if not cfg.frame_buckets:
        return size
    frames = media_frames(path)
    snapped = frame_bucket(frames, cfg.frame_buckets, cfg.num_frames)
    if not snapped:
        raise DecodeError(f"clip has {frames} frames, fewer than the smallest of data.frame_buckets "
                          f"({cfg.frame_buckets[0]})")
    return (snapped, *size)
