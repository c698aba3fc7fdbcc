"""Condition columns beside the target (Wan image-to-video and VACE): control and mask videos decode as videos,
`reference_images` holds a list of paths, and every column of a sample takes the first column's size."""

import json

import numpy as np
import pytest
from PIL import Image

from raydiff.config import DataConfig
from raydiff.data.collate import collate
from raydiff.data.decode import DecodeRow
from raydiff.data.metadata import SampleError, read_rows
from raydiff.data.shapes import write_clips_dataset


@pytest.fixture
def vace_data(tmp_path):
    write_clips_dataset(str(tmp_path), n=2, frames=11, size=16)
    for name, size in (("wide.png", (48, 32)), ("tall.png", (24, 40))):  # (w, h), neither the clips' 16x16
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    rows = [{"video": "clip0.mp4", "control_video": "clip1.mp4", "mask_video": "clip1.mp4",
             "reference_images": ["wide.png", "tall.png"], "prompt": "two references"},
            {"video": "clip1.mp4", "control_video": "clip0.mp4", "mask_video": "clip0.mp4",
             "reference_images": ["tall.png"], "prompt": "one reference"}]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def data_config(path, **kw):
    return DataConfig(base_path=str(path), metadata_path=str(path / "meta.jsonl"), num_frames=9,
                      data_file_keys=["video", "control_video", "mask_video", "reference_images"], **kw)


def test_conditions_decode_at_the_targets_size(vace_data):
    cfg = data_config(vace_data, max_pixels=16 * 16)
    rows, bad = read_rows(cfg)
    assert not bad and rows[0]["reference_images"] == [str(vace_data / "wide.png"), str(vace_data / "tall.png")]
    first, second = (DecodeRow(cfg)(r)[0] for r in rows)
    assert first["video"].shape == first["control_video"].shape == first["mask_video"].shape == (9, 16, 16, 3)
    assert first["reference_images"].shape == (2, 16, 16, 3) and second["reference_images"].shape == (1, 16, 16, 3)
    batch = collate({k: np.stack([first[k]]) for k in cfg.data_file_keys} | {"prompt": ["a"]}, "cpu",
                    cfg.data_file_keys)
    assert batch["reference_images"].shape == (1, 3, 2, 16, 16)  # laid out like a clip: (B, 3, N, H, W)
    fixed = DecodeRow(data_config(vace_data, height=32, width=32))(rows[0])[0]
    assert {fixed[k].shape[-3:-1] for k in cfg.data_file_keys} == {(32, 32)}


def test_a_missing_reference_image_names_its_row_and_file(vace_data):
    (vace_data / "tall.png").unlink()
    with pytest.raises(SampleError, match=r"row 0, file 'tall.png': file not found"):
        read_rows(data_config(vace_data))


def test_flips_turn_every_column_of_a_sample(vace_data):
    cfg = data_config(vace_data, random_flip=True)
    row = read_rows(cfg)[0][0]
    flipped = next(s for seed in range(16) for s in DecodeRow(cfg, seed=seed)(row) if seed_flips(seed, row))
    plain = DecodeRow(data_config(vace_data))(row)[0]
    for key in cfg.data_file_keys:
        np.testing.assert_array_equal(flipped[key], plain[key][..., ::-1, :])


def seed_flips(seed, row):
    from raydiff.data.plan import flipped

    return flipped(seed, row["_row"])
