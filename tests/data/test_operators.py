import struct
import time
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from raydiff.data.operators import (
    DecodeError,
    frames_for,
    load_image,
    load_video,
    resize_image,
    resize_video,
    target_size,
)


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def close(pixel, expected, tol=12):
    return np.all(np.abs(pixel.astype(int) - np.array(expected)) <= tol)


# ---- load_image: bad files -------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DecodeError, match="^zero-byte file$"):
        load_image(str(tmp_path / "a.png"))


def test_text_named_png(tmp_path):
    (tmp_path / "a.png").write_text("hello, I am not a PNG")
    with pytest.raises(DecodeError, match=r"^not an image \(cannot identify image file\)$"):
        load_image(str(tmp_path / "a.png"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.fromarray(noise(64, 64)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="^truncated or corrupt image: "):
        load_image(str(path))


def test_pixel_limit_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000), "green").save(path)
    data = path.read_bytes()
    # Cut the pixel data: a decode would fail as truncated, so the limit message proves
    # the header alone was read.
    path.write_bytes(data[: len(data) // 2])
    start = time.perf_counter()
    with pytest.raises(DecodeError) as e:
        load_image(str(path), max_pixels_before_decode=1_000_000)
    assert str(e.value) == (
        "image is 2000x2000 = 4000000 pixels, over the limit of 1000000 (data.max_image_pixels)"
    )
    assert time.perf_counter() - start < 0.5


def png_with_header_size(path, width, height):
    """A 1x1 PNG whose IHDR claims width x height: a decompression bomb's header."""
    buf = path.with_suffix(".tmp")
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.read_bytes())
    # signature (8) + length (4) + b"IHDR" (4), then width and height, then CRC over type+data
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_decompression_bomb_default_limit(tmp_path):
    path = tmp_path / "bomb.png"
    png_with_header_size(path, 20000, 20000)
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DecodeError) as e:
        load_image(str(path))
    assert str(e.value) == (
        "image is 20000x20000 = 400000000 pixels, over the limit of 178956970 (data.max_image_pixels)"
    )
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's process-wide setting is left alone


def test_our_limit_replaces_pils_global(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 32x32
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    assert load_image(str(tmp_path / "a.png")).shape == (32, 32, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---- load_image: modes and orientation -------------------------------------------------


def test_rgb_roundtrip_is_plain_uint8(tmp_path):
    arr = noise(5, 7)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert type(out) is np.ndarray and out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, arr)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=95)
    out = load_image(str(tmp_path / "a.jpg"))
    assert out.shape == (16, 16, 3) and close(out[8, 8], (255, 0, 0))


def test_16bit_grayscale_scaled(tmp_path):
    arr = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode in ("I;16", "I")
    out = load_image(str(tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, :, 0], [255, 128, 0, 1])
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4), (10, 200, 30)),
    ],
    ids=["L", "1", "P"],
)
def test_simple_modes(tmp_path, make, expected):
    make().save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert out.shape == (4, 4, 3) and close(out[0, 0], expected, tol=0)


def test_rgba_and_la_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (10, 20, 30, 0))
    im.putpixel((1, 0), (10, 20, 30, 255))
    im.save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (load_image(str(tmp_path / "la.png")) == 255).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "a.png", transparency=0)
    out = load_image(str(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 0, 0]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[:8, :8] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "a.jpg", exif=exif, quality=95)
    out = load_image(str(tmp_path / "a.jpg"))
    assert out.shape == (40, 20, 3)
    assert close(out[2, -3], (255, 0, 0), tol=40)  # stored top-left is now top-right
    assert close(out[2, 2], (0, 0, 255), tol=40)


# ---- sizing ------------------------------------------------------------------------------


def test_target_size_fixed():
    assert target_size(3000, 1000, fixed=(512, 768), max_pixels=1) == (512, 768)


@pytest.mark.parametrize("h, w", [(3000, 2000), (1080, 1920), (4000, 300), (1024, 1024), (100, 200), (10, 10)])
def test_target_size_dynamic(h, w):
    max_pixels = 512 * 512
    th, tw = target_size(h, w, fixed=None, max_pixels=max_pixels)
    assert th % 16 == 0 and tw % 16 == 0 and th >= 16 and tw >= 16
    if h * w > max_pixels:
        assert th * tw <= max_pixels
        assert abs(th / tw - h / w) <= 16 / min(th, tw) * (h / w) + 1e-9  # rounding only
    else:  # never upscale beyond flooring (at least one factor)
        assert (th, tw) == (max(16, h // 16 * 16), max(16, w // 16 * 16))
    if (h, w) == (1024, 1024):
        assert (th, tw) == (512, 512)


def test_resize_image_center_crop_keeps_centre():
    img = np.zeros((30, 300, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:200] = (0, 255, 0)
    img[:, 200:] = (0, 0, 255)
    out = resize_image(img, (16, 16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert all(close(p, (0, 255, 0), tol=3) for p in out.reshape(-1, 3))


def test_resize_image_covers_when_upscaling_and_tall():
    img = noise(10, 20)
    assert resize_image(img, (32, 32)).shape == (32, 32, 3)
    assert resize_image(noise(300, 30), (16, 48)).shape == (16, 48, 3)
    assert resize_image(img, (10, 20)) is img


def test_resize_video():
    frames = np.stack([noise(20, 40, seed=i) for i in range(5)])
    assert resize_video(frames, (16, 16)).shape == (5, 16, 16, 3)


# ---- video -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, num_frames, expected",
                         [(11, 9, 9), (11, 8, 5), (3, 9, 1), (0, 9, 0), (13, 100, 13), (4, 4, 1)])
def test_frames_for(n, num_frames, expected):
    assert frames_for(n, num_frames) == expected


def grey(i):
    return np.full((32, 32, 3), 20 * i, np.uint8)


def write_mp4(path, n):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(grey(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):  # flush the encoder's delayed frames
            container.mux(packet)
    return str(path)


@pytest.mark.parametrize("n, num_frames, expected", [(11, 9, 9), (11, 8, 5), (3, 9, 1)])
def test_load_video_mp4(tmp_path, n, num_frames, expected):
    out = load_video(write_mp4(tmp_path / "v.mp4", n), num_frames=num_frames)
    assert out.shape == (expected, 32, 32, 3) and out.dtype == np.uint8
    means = out.reshape(expected, -1).mean(axis=1)
    np.testing.assert_allclose(means, [20 * i for i in range(expected)], atol=4)  # first frames, in order


def test_load_video_pixel_limit(tmp_path):
    with pytest.raises(DecodeError, match="video is 32x32 = 1024 pixels, over the limit of 1000"):
        load_video(write_mp4(tmp_path / "v.mp4", 5), num_frames=5, max_pixels_before_decode=1000)


def test_load_video_frame_directory(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    for i in reversed(range(6)):  # creation order must not matter, names do
        Image.fromarray(grey(i)).save(d / f"f{i:03d}.png")
    (d / "notes.txt").write_text("not a frame")
    out = load_video(str(d), num_frames=9)
    assert out.shape == (5, 32, 32, 3)
    assert [int(f[0, 0, 0]) for f in out] == [0, 20, 40, 60, 80]


def test_load_video_single_image(tmp_path):
    Image.fromarray(noise(12, 20)).save(tmp_path / "a.png")
    out = load_video(str(tmp_path / "a.png"), num_frames=9)
    assert out.shape == (1, 12, 20, 3)


def test_load_video_bad_inputs(tmp_path):
    (tmp_path / "a.mp4").write_text("definitely not a video")
    with pytest.raises(DecodeError, match="^not a video: "):
        load_video(str(tmp_path / "a.mp4"), num_frames=9)
    (tmp_path / "b.mp4").write_bytes(b"")
    with pytest.raises(DecodeError, match="^zero-byte file$"):
        load_video(str(tmp_path / "b.mp4"), num_frames=9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DecodeError, match="0 decodable frames"):
        load_video(str(tmp_path / "empty"), num_frames=9)
