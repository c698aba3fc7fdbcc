"""Decode and size images and videos into uint8 numpy arrays.

Plain functions for a Ray Data map stage: they return numpy arrays only (never PIL
objects, which do not belong in Arrow blocks) and raise `DecodeError` with a bare
reason; the caller knows the row and file and wraps it into a `SampleError`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS at import), so by default we refuse
# exactly what PIL would refuse, with our message and config key.
DEFAULT_MAX_PIXELS_BEFORE_DECODE = 178_956_970
_PIL_LIMIT_LOCK = threading.Lock()


class DecodeError(ValueError):
    """A file we cannot turn into pixels; str() is the reason alone."""


def load_image(path: str | bytes, *,
               max_pixels_before_decode: int = DEFAULT_MAX_PIXELS_BEFORE_DECODE) -> np.ndarray:
    """Decode an image file (a path, or its bytes) to uint8 RGB, shape (H, W, 3), EXIF orientation applied.

    Transparency is composited on white, CMYK converted, 16-bit grayscale scaled to 8 bits.
    The size is checked against `max_pixels_before_decode` from the header, before any
    pixel data is decoded, so a decompression bomb costs a header read.
    """
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise DecodeError("zero-byte file")
        path = io.BytesIO(path)
    else:
        try:
            if os.path.getsize(path) == 0:
                raise DecodeError("zero-byte file")
        except FileNotFoundError as e:
            raise DecodeError("file not found") from e
        except OSError as e:
            raise DecodeError(f"cannot read file: {e.strerror or e}") from e
    try:
        with _open_image(path) as im:
            w, h = im.size
            if w * h > max_pixels_before_decode:
                raise _too_big(w, h, max_pixels_before_decode)
            try:
                im.load()
            except Image.DecompressionBombError:  # multi-frame formats re-check on load
                raise _too_big(w, h, max_pixels_before_decode) from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise DecodeError(f"truncated or corrupt image: {e}") from e
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im)
    except UnidentifiedImageError as e:
        raise DecodeError("not an image (cannot identify image file)") from e


def _open_image(path: str) -> Image.Image:
    # Image.open applies PIL's bomb check from a module global. Lift it only for the header
    # read, under a lock, so our per-call limit replaces it without changing the process-wide
    # setting that other PIL users rely on.
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        except (OSError, SyntaxError) as e:
            if isinstance(e, UnidentifiedImageError):
                raise
            raise DecodeError(f"truncated or corrupt image: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_big(w: int, h: int, limit: int) -> DecodeError:
    return DecodeError(
        f"image is {w}x{h} = {w * h} pixels, over the limit of {limit} (data.max_image_pixels)"
    )


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3). Modes PIL's convert("RGB") gets wrong are handled first."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # convert("L") clips 16-bit values at 255 instead of scaling them; "I" is how older
        # Pillow opens 16-bit PNGs, so it gets the same 0..65535 range.
        a = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        gray = ((a + 128) // 257).astype(np.uint8)  # rounds: 65535 -> 255, 32896 -> 128
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Dropping alpha would expose whatever colour transparent pixels hold (often black).
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return np.array(white)
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))


def target_size(
    height: int,
    width: int,
    *,
    fixed: tuple[int, int] | None,
    max_pixels: int,
    division_factor: int = 16,
) -> tuple[int, int]:
    """(h, w) to train at: `fixed` as given, else the image shrunk to at most `max_pixels`.

    Dynamic sizing keeps the aspect ratio, never upscales, and floors each side to a
    multiple of `division_factor` (at least one factor), as DiffSynth's image operator.
    """
    if fixed is not None:
        return int(fixed[0]), int(fixed[1])
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    # The epsilon keeps 1024 * 0.5 from landing on 511.999... and flooring a whole factor.
    h = max(division_factor, int(height * scale + 1e-6) // division_factor * division_factor)
    w = max(division_factor, int(width * scale + 1e-6) // division_factor * division_factor)
    return h, w


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (H, W, 3) to cover `size` = (h, w), then center-crop to (h, w, 3)."""
    H, W = image.shape[:2]
    th, tw = size
    if (H, W) == (th, tw):
        return image
    scale = max(th / H, tw / W)
    # Crop in source coordinates and resample once: PIL's `box` takes float edges, so the
    # crop stays centred without rounding an intermediate image.
    ch, cw = th / scale, tw / scale
    box = ((W - cw) / 2, (H - ch) / 2, (W + cw) / 2, (H + ch) / 2)
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return np.array(Image.fromarray(image).resize((tw, th), resample, box=box))


def resize_video(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (F, H, W, 3) -> (F, h, w, 3), each frame as `resize_image`."""
    return np.stack([resize_image(f, size) for f in frames])


def frames_for(n_available: int, num_frames: int) -> int:
    """Frames to use: the largest n <= min(n_available, num_frames) with n % 4 == 1, or 0.

    Video VAEs (Wan) compress time 4x after the first frame, so clips hold 4k + 1 frames.
    """
    n = min(n_available, num_frames)
    return 0 if n < 1 else n - (n - 1) % 4


@functools.cache
def _image_extensions() -> frozenset[str]:
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def frame_names(directory: str) -> list[str]:
    """The frame images of a video stored as a directory, in name order (the order they play in)."""
    return sorted(n for n in os.listdir(directory) if os.path.splitext(n)[1].lower() in _image_extensions())


def load_video(
    path: str | bytes, *, num_frames: int, max_pixels_before_decode: int = DEFAULT_MAX_PIXELS_BEFORE_DECODE
) -> np.ndarray:
    """Decode the first frames of a video to uint8 (F, H, W, 3), F = frames_for(available, num_frames).

    `path` is a video file (anything FFmpeg reads, or its bytes), a directory of frame images (taken in
    name order), or a single image (a one-frame video). Raises DecodeError.
    """
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise DecodeError("zero-byte file")
        path = io.BytesIO(path)
    elif os.path.isdir(path):
        names = frame_names(path)
        n = frames_for(len(names), num_frames)
        if n == 0:
            raise DecodeError("video has 0 decodable frames (no image files in the directory)")
        frames = [load_image(os.path.join(path, name), max_pixels_before_decode=max_pixels_before_decode)
                  for name in names[:n]]
        if len({f.shape for f in frames}) > 1:
            raise DecodeError(f"frames differ in size: {sorted({f.shape[:2] for f in frames})}")
        return np.stack(frames)
    if isinstance(path, str) and os.path.splitext(path)[1].lower() in _image_extensions():
        return load_image(path, max_pixels_before_decode=max_pixels_before_decode)[None]
    frames = _decode_video(path, num_frames, max_pixels_before_decode)
    n = frames_for(len(frames), num_frames)
    if n == 0:
        raise DecodeError("video has 0 decodable frames")
    return np.stack(frames[:n])


def _decode_video(path: str, num_frames: int, max_pixels: int) -> list[np.ndarray]:
    import av  # imported here so image-only datasets never load FFmpeg

    if isinstance(path, str) and os.path.exists(path) and os.path.getsize(path) == 0:
        raise DecodeError("zero-byte file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:  # str(e) repeats the errno and path; strerror is the reason
        raise DecodeError(f"not a video: {e.strerror or e}") from e
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise DecodeError("not a video: no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # PyAV's answer for a stream it could not probe (cut-off mp4)
            raise DecodeError("not a video: video stream has no decodable codec")
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise DecodeError(f"video is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                              f"(data.max_image_pixels)")
        stream.thread_type = "AUTO"  # frame threads; we stop after num_frames anyway
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= num_frames:
                    break
        except av.FFmpegError as e:
            if not frames:
                raise DecodeError(f"not a video: {e.strerror or e}") from e
            # A damaged tail still leaves the decoded head usable; frames_for trims it.
    return frames
