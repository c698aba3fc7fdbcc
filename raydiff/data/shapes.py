"""Small synthetic datasets written on demand, so the demo, the tiny examples and the tests need no
download and the repository holds no binaries: coloured shapes (images; with their edge maps as ControlNet
control images; recoloured by instruction as edit pairs), moving squares (clips) and clips with VACE conditions
(control clip, mask clip, reference image).

    python -c "from raydiff.data.shapes import write_shapes_dataset as w; w('data/shapes')"
    python -c "from raydiff.data.shapes import write_clips_dataset as w; w('data/clips')"
    python -c "from raydiff.data.shapes import write_vace_dataset as w; w('data/vace')"
    python -c "from raydiff.data.shapes import write_control_dataset as w; w('data/control')"
    python -c "from raydiff.data.shapes import write_edit_dataset as w; w('data/edits')"
"""

from __future__ import annotations

import csv
import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, color: tuple, size: tuple[int, int], rng: random.Random,
               spread: float = 0.1, background: tuple = (245, 245, 240)) -> Image.Image:
    """`shape` in `color` on `background`, its centre up to `spread` (a fraction of the side) off the
    image's centre, its radius 25-40% of the shorter side."""
    w, h = size
    image = Image.new("RGB", size, background)
    d = ImageDraw.Draw(image)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w / 2 + rng.uniform(-spread, spread) * w, h / 2 + rng.uniform(-spread, spread) * h
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def write_csv(path: str, rows: list[dict]) -> str:
    """`rows` as a CSV with a header of the first row's keys; returns `path`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_shapes_dataset(directory: str, n: int = 16, size: tuple[int, int] | list = (32, 32), seed: int = 0,
                         metadata_name: str = "metadata.csv") -> str:
    """Write `n` PNGs and a metadata CSV (image,prompt); `size` is (w, h) or a list of sizes to cycle
    through (mixed aspect ratios). Returns the metadata path."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    sizes = size if isinstance(size, list) else [size]
    rows = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        name = f"{i:04d}.png"
        draw_shape(shape, COLORS[color], tuple(sizes[i % len(sizes)]), rng).save(os.path.join(directory, name))
        rows.append({"image": name, "prompt": f"a {color} {shape}"})
    return write_csv(os.path.join(directory, metadata_name), rows)


def write_control_dataset(directory: str, n: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> str:
    """`write_shapes_dataset` plus, per image, a control image: its edges (white on black, as a canny map), in
    `control/`; metadata `metadata.csv` with image, control_image and prompt. Returns the metadata path."""
    from PIL import ImageFilter

    path = write_shapes_dataset(directory, n=n, size=size, seed=seed)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    os.makedirs(os.path.join(directory, "control"), exist_ok=True)
    for row in rows:
        edges = Image.open(os.path.join(directory, row["image"])).convert("L").filter(ImageFilter.FIND_EDGES)
        row["control_image"] = f"control/{row['image']}"
        edges.point(lambda v: 255 if v > 24 else 0).convert("RGB").save(os.path.join(directory, row["control_image"]))
    return write_csv(path, [{"image": r["image"], "control_image": r["control_image"], "prompt": r["prompt"]}
                            for r in rows])


def write_edit_dataset(directory: str, n: int = 16, size: tuple[int, int] = (32, 32), seed: int = 0,
                       spread: float = 0.25) -> str:
    """Edit pairs, shapes recoloured by instruction: per row a shape on a random background (`source/`) and the
    same shape, at the same place and size on the same background, in another colour (`target/`); metadata
    `metadata.csv` with image (the target), edit_image (the source) and prompt ("make the circle blue"). The
    prompt names the shape and its new colour only: where the shape is, how big, and the background, the model
    can learn from the source alone. `spread`: how far off centre a shape may sit. Returns the metadata path."""
    rng = random.Random(seed)
    for sub in ("source", "target"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    rows = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        before, after = rng.sample(list(COLORS), 2)
        geometry = rng.getrandbits(32)  # one seed for both drawings: the same centre and radius
        background = tuple(rng.randint(0, 255) for _ in range(3))
        name = f"{i:04d}.png"
        for sub, color in (("source", before), ("target", after)):
            image = draw_shape(shape, COLORS[color], size, random.Random(geometry), spread, background)
            image.save(os.path.join(directory, sub, name))
        rows.append({"image": f"target/{name}", "edit_image": f"source/{name}", "prompt": f"make the {shape} {after}"})
    return write_csv(os.path.join(directory, "metadata.csv"), rows)


def write_vace_dataset(directory: str, n: int = 4, frames: int = 11, size: int = 16) -> str:
    """`write_clips_dataset` plus, per clip, a control clip (the next clip), a mask clip (right half white: to
    regenerate) and a reference image (its first frame); metadata `metadata.jsonl` with video, control_video,
    mask_video, reference_images (a list) and prompt. Returns the metadata path."""
    import json

    import av
    import numpy as np

    write_clips_dataset(directory, n=n, frames=frames, size=size)
    mask = np.zeros((size, size, 3), np.uint8)
    mask[:, size // 2:] = 255
    with av.open(os.path.join(directory, "mask.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(mask, format="rgb24")))
        container.mux(stream.encode())
    rows = []
    for i in range(n):
        with av.open(os.path.join(directory, f"clip{i}.mp4")) as container:
            first = next(container.decode(video=0)).to_image()
        first.save(os.path.join(directory, f"ref{i}.png"))
        rows.append({"video": f"clip{i}.mp4", "control_video": f"clip{(i + 1) % n}.mp4", "mask_video": "mask.mp4",
                     "reference_images": [f"ref{i}.png"], "prompt": f"a red square moving right {i}"})
    path = os.path.join(directory, "metadata.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_clips_dataset(directory: str, n: int = 4, frames: int | list[int] = 11,
                        size: int | tuple[int, int] | list = 16, container: str = "mp4") -> str:
    """`n` short clips of a square moving right (PyAV, mpeg4) and a metadata CSV (video,prompt). `frames`
    (per clip) and `size` ((w, h), or the side of a square) may be lists, cycled through: clips of mixed
    lengths and sizes. `container` is the file extension: `mp4` stores each clip's frame count, `mkv` does
    not. Returns the metadata path."""
    import av
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    lengths = frames if isinstance(frames, list) else [frames]
    sizes = size if isinstance(size, list) else [size]
    rows = []
    for i in range(n):
        name = f"clip{i}.{container}"
        clip_size = sizes[i % len(sizes)]
        w, h = (clip_size, clip_size) if isinstance(clip_size, int) else clip_size
        with av.open(os.path.join(directory, name), "w") as out:
            stream = out.add_stream("mpeg4", rate=8)
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv420p"
            for t in range(lengths[i % len(lengths)]):
                img = np.full((h, w, 3), 30, np.uint8)
                img[4:10, (t + i) % 10:(t + i) % 10 + 6] = (200, 60, 60)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(stream.encode())
        rows.append({"video": name, "prompt": f"a red square moving right {i}"})
    return write_csv(os.path.join(directory, "metadata.csv"), rows)


def write_shards(rows: list[dict], directory: str, sizes: list[int], kind: str = "parquet",
                 row_group_size: int | None = None) -> list[str]:
    """Split metadata `rows` into shards of the given sizes (parquet, with `row_group_size` rows per row
    group; jsonl or csv); returns their paths."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    assert sum(sizes) <= len(rows), "more shard rows than rows"
    os.makedirs(directory, exist_ok=True)
    paths, start = [], 0
    for k, n in enumerate(sizes):
        part, start = rows[start:start + n], start + n
        path = os.path.join(directory, f"part-{k:05d}.{kind}")
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(part), path, row_group_size=row_group_size)
        elif kind == "jsonl":
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
        else:
            write_csv(path, part)
        paths.append(path)
    return paths


def write_webdataset(directory: str, sizes: list[int], size: tuple[int, int] = (32, 32), seed: int = 0) -> list[str]:
    """WebDataset tar shards of shapes: `<key>.png` + `<key>.txt` per sample; returns their paths."""
    import io
    import tarfile

    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    paths, key = [], 0
    for k, n in enumerate(sizes):
        path = os.path.join(directory, f"shard-{k:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for _ in range(n):
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                png = io.BytesIO()
                draw_shape(shape, COLORS[color], size, rng).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", f"a {color} {shape}".encode())):
                    info = tarfile.TarInfo(f"{key:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                key += 1
        paths.append(path)
    return paths
