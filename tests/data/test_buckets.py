"""Aspect-ratio buckets: the bucket list, assignment from headers, batches of one size, and equal
whole-batch splits across workers."""

import math

import pytest
from PIL import Image
from test_preprocess import batches_of  # noqa: E402  (pytest puts tests/data on sys.path)

from raydiff.data.buckets import assign_bucket, bucket_sizes, media_size, plan_batches
from raydiff.data.collate import collate
from raydiff.data.dataset import build_train_data
from raydiff.data.metadata import read_rows
from raydiff.data.shapes import write_shapes_dataset


def test_bucket_sizes_fit_the_area_the_factor_and_the_ratio_range():
    sizes = bucket_sizes(1024 * 1024, 16)
    assert (1024, 1024) in sizes and (512, 2048) in sizes and (2048, 512) in sizes
    for h, w in sizes:
        assert h * w <= 1024 * 1024 and h % 16 == 0 and w % 16 == 0 and 0.25 <= h / w <= 4
        assert h * w > 0.9 * 1024 * 1024  # each near the target area
    assert bucket_sizes(2048, 16) == [(32, 64), (32, 48), (32, 32), (48, 32), (64, 32)]


def test_each_image_goes_to_the_bucket_of_closest_aspect_ratio():
    sizes = bucket_sizes(1024 * 1024, 16)
    assert assign_bucket(768, 1024, sizes) == min(sizes, key=lambda s: abs(math.log(s[0] / s[1] / 0.75)))
    assert assign_bucket(3000, 3000, sizes) == (1024, 1024)
    assert assign_bucket(10, 1000, sizes) == (512, 2048)  # beyond 1:4 -> the widest bucket


def test_media_size_reads_headers_and_applies_exif_rotation(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (64, 32)).save(path, exif=exif)
    assert media_size(path) == (64, 32)  # (h, w) after rotation


def test_plan_batches_keeps_one_bucket_per_batch_and_whole_batches_per_worker():
    rows = [{"_row": i} for i in range(23)]
    sizes = {i: [(32, 32), (32, 64), (64, 32)][i % 3] for i in range(23)}
    batches = plan_batches(rows, sizes, batch_size=3, num_workers=2)
    assert len(batches) == 6  # buckets of 8, 8, 7 rows -> 2 + 2 + 2 batches
    assert all(len({tuple(r["_size"]) for r in b}) == 1 and len(b) == 3 for b in batches)
    assert [b[0]["_row"] for b in batches] == sorted(b[0]["_row"] for b in batches)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """24 images cycling through 32x32, 64x32 and 32x64 (w x h)."""
    path = str(tmp_path_factory.mktemp("mixed"))
    write_shapes_dataset(path, n=24, size=[(32, 32), (64, 32), (32, 64)])
    return path


@pytest.mark.slow
def test_buckets_give_every_worker_the_same_number_of_whole_batches_of_one_size(ray_session, make_config, mixed):
    """The batches as the two workers' Ray Data splits deliver them (inline mode). That stream and cache
    mode train on the same batches is tests/launch/test_preprocess_modes.py: the same three sizes, 8 images
    each, a whole epoch on two workers, the same losses and LoRA in all three modes."""
    cfg = make_config(data={"base_path": mixed, "metadata_path": f"{mixed}/metadata.csv", "height": None,
                            "width": None, "max_pixels": 2048, "buckets": True},
                      train={"batch_size": 4}, ray={"num_workers": 2})
    rows, _ = read_rows(cfg.data)
    data = build_train_data(cfg, rows, seed=0)
    assert data.packed and data.num_batches == 6  # 3 buckets x 8 images / 4
    per_worker = batches_of(data.dataset, 1, workers=2)
    assert [len(w) for w in per_worker] == [3, 3]
    seen = []
    for batch in (b for batches in per_worker for b in batches):
        inputs = collate(batch, "cpu", cfg.data.data_file_keys)
        assert inputs["image"].shape[0] == 4 and inputs["image"].shape[-2:] in {(32, 32), (32, 64), (64, 32)}
        seen.append(tuple(sorted(int(r) for r in batch["_row"][0])))
    assert len(set(seen)) == 6 and all(len({r % 3 for r in b}) == 1 for b in seen)  # one source size each
