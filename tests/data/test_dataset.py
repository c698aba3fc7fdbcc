"""The Ray Data pipeline: decode in Ray tasks, clear errors for bad samples, skip-and-count."""

import os

import numpy as np
import pytest

from raydiff.config import DataConfig
from raydiff.data.collate import collate
from raydiff.data.dataset import build_dataset
from raydiff.data.decode import skip_counter
from raydiff.data.metadata import SampleError, read_rows
from raydiff.data.shapes import write_shapes_dataset


@pytest.fixture
def dirty(tmp_path):
    """8 good images, one truncated PNG (row 8) and one missing file (row 9)."""
    meta = write_shapes_dataset(str(tmp_path), n=8)
    good = (tmp_path / "0000.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    with open(meta, "a") as f:
        f.write("broken.png,a broken image\nmissing.png,a missing image\n")
    return tmp_path


def data_cfg(path, **kw):
    return DataConfig(**{"base_path": str(path), "metadata_path": os.path.join(path, "metadata.csv"),
                         "height": 32, "width": 32, **kw})


def test_decoded_samples_have_the_configured_size(ray_session, shapes):
    cfg = data_cfg(shapes, height=16, width=32)
    rows, bad = read_rows(cfg)
    samples = build_dataset(cfg, rows, seed=0).take_all()
    assert len(samples) == 16 and not bad
    assert all(s["image"].shape == (16, 32, 3) and s["image"].dtype == np.uint8 for s in samples)
    batch = collate({"image": np.stack([s["image"] for s in samples[:2]]), "prompt": ["a", "b"]}, "cpu")
    assert batch["image"].shape == (2, 3, 16, 32) and -1 <= batch["image"].min() and batch["image"].max() <= 1


def test_missing_file_fails_before_ray_with_row_and_file(dirty):
    with pytest.raises(SampleError, match=r"row 9, file '.*missing.png': file not found"):
        read_rows(data_cfg(dirty))


def test_corrupt_image_fails_in_the_data_stage_with_row_and_file(ray_session, dirty):
    cfg = data_cfg(dirty, skip_bad_samples=True)
    rows, _ = read_rows(cfg)
    strict = data_cfg(dirty, skip_bad_samples=False)
    with pytest.raises(Exception, match=r"row 8, file '.*broken.png': truncated or corrupt image"):
        build_dataset(strict, rows, seed=0).take_all()


def test_bad_samples_are_skipped_and_counted(ray_session, dirty):
    cfg = data_cfg(dirty, skip_bad_samples=True, shuffle=False)
    rows, bad = read_rows(cfg)
    assert [b.row for b in bad] == [9]
    counter = skip_counter("test-skip")
    samples = build_dataset(cfg, rows, seed=0, counter_name="raydiff-skips-test-skip").take_all()
    assert sorted(s["_row"] for s in samples) == list(range(8))
    assert ray_session.get(counter.count.remote()) == 1  # the truncated PNG; row 9 never reached the stage
