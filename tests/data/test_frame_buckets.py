"""Frame buckets (`data.frame_buckets`): clips bucket by (frames, height, width), their lengths read from
headers without decoding and snapped down to a listed 4k + 1 count; every worker gets the same whole
batches, and inline, stream and cache modes give the same batches and losses."""

import json
import os

import av
import numpy as np
import pytest
import torch
from test_preprocess import batches_of  # noqa: E402  (pytest puts tests/data on sys.path)

from raydiff.config import DataConfig
from raydiff.data.buckets import frame_bucket, media_frames, plan_batches, row_buckets
from raydiff.data.cache_io import CacheLayout, columns_to_table, table_to_columns
from raydiff.data.collate import collate
from raydiff.data.decode import DecodeRow, skip_counter, skip_counter_name, skipped_samples
from raydiff.data.metadata import BadSample, SampleError, read_rows
from raydiff.data.operators import load_video
from raydiff.data.shapes import write_clips_dataset

# 17 clips: one too short for any bucket, then lengths 7, 11, 14, 20 (-> frame buckets 5, 9, 13, 13 at
# num_frames 13), eight 16x16 and eight 32x16 (w x h).
LENGTHS = [3] + [7, 11, 14, 20] * 4
SIZES = [16] * 9 + [(32, 16)] * 8


def snapped(row: int) -> int:
    return frame_bucket(LENGTHS[row], [5, 9, 13], 13)


def clips_config(path, **kw):
    data = {"base_path": str(path), "metadata_path": str(path / "metadata.csv"), "data_file_keys": ["video"],
            "buckets": True, "frame_buckets": [5, 9, 13], "num_frames": 13, "max_pixels": 512, **kw}
    return DataConfig(**data)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips")
    write_clips_dataset(str(path), n=len(LENGTHS), frames=LENGTHS, size=SIZES)
    return path


def test_a_clip_snaps_down_to_the_longest_frame_bucket_it_fills():
    buckets = [5, 9, 13]
    assert [frame_bucket(n, buckets, 81) for n in (5, 8, 9, 12, 13, 200)] == [5, 5, 9, 9, 13, 13]
    assert frame_bucket(200, buckets, 11) == 9  # never above data.num_frames
    assert frame_bucket(4, buckets, 81) == 0  # shorter than every bucket
    assert frame_bucket(1, [1, 5], 81) == 1  # a still in a video column is a one-frame clip



def test_the_config_refuses_frame_buckets_that_break_the_frame_rule_naming_the_value(tmp_path):
    assert clips_config(tmp_path, frame_buckets=[13, 5, 9, 5]).frame_buckets == [5, 9, 13]
    for buckets in ([5, 8, 9], [0], [12]):
        bad = next(n for n in buckets if n % 4 != 1)
        with pytest.raises(ValueError, match=rf"frame_buckets\n.* {bad} is not 4k \+ 1 frames"):
            clips_config(tmp_path, frame_buckets=buckets)
    with pytest.raises(ValueError, match=r"frame_buckets\n.* empty; list frame counts"):
        clips_config(tmp_path, frame_buckets=[])
    with pytest.raises(ValueError, match="data.frame_buckets needs data.buckets: true"):
        clips_config(tmp_path, buckets=False)
    with pytest.raises(ValueError, match="data.frame_buckets: 17, 21 above data.num_frames 13"):
        clips_config(tmp_path, frame_buckets=[5, 17, 21])
    with pytest.raises(ValueError, match="first of data.data_file_keys is 'image', not 'video'"):
        clips_config(tmp_path, data_file_keys=["image"])
    assert DataConfig(metadata_path=str(tmp_path / "m.csv")).frame_buckets is None  # off by default

class DemuxOnly:
    """An av container that demuxes but cannot decode: its packets expose their size and nothing else."""

    def __init__(self, container):
        self.container = container
        self.streams = container.streams

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def demux(self, *streams):
        for packet in self.container.demux(*streams):
            yield type("Packet", (), {"size": packet.size})()


def test_frame_counts_are_read_without_decoding(tmp_path, monkeypatch):
    write_clips_dataset(str(tmp_path / "mp4"), n=1, frames=13)
    write_clips_dataset(str(tmp_path / "mkv"), n=1, frames=9, container="mkv")
    mp4, mkv = str(tmp_path / "mp4" / "clip0.mp4"), str(tmp_path / "mkv" / "clip0.mkv")
    with av.open(mkv) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no count: the demuxing fallback runs
    decoded = {mp4: len(load_video(mp4, num_frames=100)), mkv: len(load_video(mkv, num_frames=100))}
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i in range(3):  # not images at all: counting a frames folder must not open them
        (frames_dir / f"{i:03d}.png").write_bytes(b"not a png")
    (tmp_path / "still.png").write_bytes(b"not a png either")

    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: DemuxOnly(real_open(*a, **k)))
    assert {p: media_frames(p) for p in decoded} == decoded == {mp4: 13, mkv: 9}
    assert media_frames(str(frames_dir)) == 3 and media_frames(str(tmp_path / "still.png")) == 1
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a video"):
        media_frames(str(tmp_path / "junk.mp4"))


def test_clips_bucket_by_frames_and_size_and_a_too_short_one_is_a_bad_sample(clips):
    cfg = clips_config(clips, skip_bad_samples=True)
    rows, _ = read_rows(cfg)
    sizes, bad = row_buckets(cfg, rows)
    assert bad == [BadSample(0, str(clips / "clip0.mp4"),
                             "clip has 3 frames, fewer than the smallest of data.frame_buckets (5)")]
    assert sizes == {r: (snapped(r), 16, 16 if r < 9 else 32) for r in range(1, 17)}
    with pytest.raises(SampleError, match=r"row 0, file '.*clip0.mp4': clip has 3 frames"):
        row_buckets(clips_config(clips), rows)


def test_mixed_lengths_and_sizes_give_every_worker_the_same_whole_batches():
    rng = np.random.default_rng(0)
    for workers, batch_size in ((2, 2), (3, 4), (4, 1)):
        rows = [{"_row": i} for i in range(101)]
        sizes = {i: (int(rng.choice([5, 9, 13, 17])), *[(16, 16), (16, 32), (32, 16)][rng.integers(3)])
                 for i in range(101)}
        batches = plan_batches(rows, sizes, batch_size=batch_size, num_workers=workers)
        assert batches and len(batches) % workers == 0
        per_rank = [batches[r::workers] for r in range(workers)]  # the round-robin split the trainer gets
        assert len({len(b) for b in per_rank}) == 1
        for batch in batches:
            assert len(batch) == batch_size and len({tuple(r["_size"]) for r in batch}) == 1
            assert all(tuple(r["_size"]) == sizes[r["_row"]] and len(r["_size"]) == 3 for r in batch)


def test_a_bucket_batch_of_clips_decodes_to_its_frames_and_size(clips):
    cfg = clips_config(clips)
    rows = {r["_row"]: r for r in read_rows(cfg)[0]}
    members = [{**rows[r], "_size": [9, 16, 32], "_rep": 0} for r in (10, 12)]  # 11 and 20 frames, 32x16
    packed = DecodeRow(cfg)({"_batch": 0, "_rows": json.dumps(members)})[0]
    assert packed["video"].shape == (2, 9, 16, 32, 3) and packed["_packed"] == 2
    batch = collate({k: [v] for k, v in packed.items()}, "cpu", ["video"])  # as a worker gets the packed row
    assert batch["video"].shape == (2, 3, 9, 16, 32)


def test_a_clip_that_decodes_short_of_its_frame_bucket_is_a_bad_sample(clips):
    # 7 frames, 5 of them usable (4k + 1): as if its header had over-counted
    row = {**read_rows(clips_config(clips))[0][1], "_size": [13, 16, 16]}
    short = r"row 1, file '.*clip1.mp4': decoded 5 usable \(4k \+ 1\) frames, fewer than the 13"
    with pytest.raises(SampleError, match=short):
        DecodeRow(clips_config(clips))(row)
    assert DecodeRow(clips_config(clips, skip_bad_samples=True))(row) == []


def test_the_cache_index_holds_each_clips_frames_and_size(tmp_path):
    layout = CacheLayout(str(tmp_path))
    cols = {"_row": [3, 4], "_size": [[9, 16, 32], [13, 16, 16]], "latents": [np.zeros((2, 2)), np.ones((2, 2))]}
    layout.write_table(layout.shard(0), columns_to_table(cols))
    assert layout.index([layout.shard(0)]) == [(3, [9, 16, 32]), (4, [13, 16, 16])]
    back = table_to_columns(columns_to_table(cols))
    np.testing.assert_array_equal(back["_size"], [[9, 16, 32], [13, 16, 16]])
    assert table_to_columns(columns_to_table({"_row": [], "_size": []}))["_size"].shape == (0, 2)


@pytest.mark.slow
def test_frame_buckets_give_the_same_batches_and_losses_in_every_mode(ray_session, make_config, clips, tmp_path):
    from raydiff.data.components import training_components
    from raydiff.data.dataset import build_train_data
    from raydiff.training.module import PipelineTrainingModule

    results = {}
    for mode in ("inline", "stream", "cache"):
        data = clips_config(clips, skip_bad_samples=True, preprocess=mode, cache_dir=str(tmp_path / "cache"),
                            encoder_num_cpus=0.5, encoder_batch_size=4).model_dump()
        cfg = make_config(f"frames-{mode}", family="wan", model={"family": "wan"}, data=data,
                          train={"batch_size": 2}, ray={"num_workers": 2})
        rows, _ = read_rows(cfg.data)
        counter = skip_counter(cfg.ray.name)
        train = build_train_data(cfg, rows, seed=0, counter_name=skip_counter_name(cfg.ray.name))
        # Per size: 2 + 2 + 4 clips in frame buckets 5, 9, 13 -> 1 + 1 + 2 batches of 2; 8 in all.
        assert train.packed and train.num_batches == 8
        per_worker = batches_of(train.dataset, 1, workers=2)
        assert [len(w) for w in per_worker] == [4, 4]
        module = PipelineTrainingModule(cfg, components=training_components(cfg))
        seen, losses = [], []
        for batches in per_worker:
            for i, batch in enumerate(batches):
                members = [int(r) for r in batch["_row"][0]]
                frames, width = snapped(members[0]), 16 if members[0] < 9 else 32
                assert {(snapped(r), r < 9) for r in members} == {(frames, members[0] < 9)}  # one bucket
                inputs = collate(batch, "cpu", cfg.data.data_file_keys)
                if mode == "inline":
                    assert inputs["video"].shape == (2, 3, frames, 16, width)
                else:  # Wan's VAE: 4x in time after the first frame, 8x in space
                    assert inputs["latents"].shape == (2, 16, (frames - 1) // 4 + 1, 2, width // 8)
                seen.append(tuple(members))
                with torch.no_grad():
                    losses.append(module(inputs, generator=torch.Generator().manual_seed(i)).item())
        assert skipped_samples(skip_counter_name(cfg.ray.name)) == 1  # the 3-frame clip, in every mode
        ray_session.kill(counter)
        results[mode] = seen, losses
    assert sorted(r for b in results["inline"][0] for r in b) == list(range(1, 17))
    assert results["inline"][0] == results["stream"][0] == results["cache"][0]
    np.testing.assert_allclose(results["stream"][1], results["inline"][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["cache"][1], results["inline"][1], rtol=1e-5, atol=1e-6)
    assert os.path.exists(tmp_path / "cache" / "manifest.json")
