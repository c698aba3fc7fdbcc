"""data.preprocess: the stream/cache encoder loads everything but the DiT; the parquet cache (manifest, no-op
re-run, resume, invalidation); encoded-column round trips; caption dropout and flips that agree across modes;
stream mode's eval set and empty prompt. That inline, stream and cache train the same samples, losses and LoRA
on 2 workers is tests/launch/test_preprocess_modes.py's check; `batches_of` serves the bucket tests."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from raydiff.config import to_remote
from raydiff.data.cache import cache_identity, describe_changes, eval_identity, preprocess
from raydiff.data.cache_io import CacheLayout, columns_to_table, read_eval_set, table_to_columns
from raydiff.data.collate import collate
from raydiff.data.columns import columns_to_inputs, to_columns
from raydiff.data.decode import DecodeRow
from raydiff.data.encode import encode_empty_prompt
from raydiff.data.encoder import Encoder
from raydiff.data.eval_set import eval_samples, start_eval_set
from raydiff.data.metadata import read_rows
from raydiff.data.plan import CaptionDropout, caption_dropped, flipped
from raydiff.pipelines.flux import FluxImagePipeline


def mode_config(make_config, tmp_path, mode, train=None, **data):
    return make_config(data={"preprocess": mode, "cache_dir": str(tmp_path / "cache"), "encoder_num_cpus": 0.5,
                             "encoder_batch_size": 3, **data}, train=train or {})


def batches_of(ds, batch_size, workers=1):
    """What each of `workers` training workers iterates: Ray's equal split with the trainer's
    preserve_order, consumed concurrently (as the workers do). One worker: a flat list."""
    import threading

    ds.context.execution_options.preserve_order = True  # a dataset keeps the context it was built with
    if workers == 1:
        return list(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    out = [[] for _ in range(workers)]

    def consume(i, it):
        out[i] = list(it.iter_batches(batch_size=batch_size, batch_format="numpy"))

    threads = [threading.Thread(target=consume, args=(i, it))
               for i, it in enumerate(ds.streaming_split(workers, equal=True))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_encoded_columns_round_trip_through_parquet_without_pickle():
    outputs = {"latents": torch.randn(3, 4, 2, 2), "prompt_embeds": torch.randn(3, 5, 8).bfloat16(),
               "mask": torch.ones(3, 5, dtype=torch.long), "text_ids": torch.zeros(3, 3),  # (L=3, 3): no batch axis
               "height": 32, "guidance": None}
    cols = to_columns(outputs, 3, FluxImagePipeline.shared_outputs)  # FLUX's text_ids have no batch axis
    assert sorted(cols) == ["guidance:none", "height:shared", "latents", "mask", "prompt_embeds:bf16",
                            "text_ids:shared"]
    table = columns_to_table({**cols, "prompt": ["a", "b", "c"], "_row": [0, 1, 2]})
    assert {str(t) for t in table.schema.types} <= {"binary", "string", "int64", "list<item: int32>"}
    back = columns_to_inputs(table_to_columns(table), "cpu")
    assert torch.equal(back["latents"], outputs["latents"]) and back["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(back["prompt_embeds"], outputs["prompt_embeds"]) and back["mask"].dtype == torch.long
    assert back["text_ids"].shape == (3, 3) and back["height"] == 32 and back["guidance"] is None


def test_prompt_embeddings_of_different_lengths_are_padded_in_collate():
    batch = {"prompt": ["a", "b"], "_row": np.array([0, 1]),
             "prompt_embeds": [np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)],
             "prompt_embeds_mask": [np.ones(2, np.int64), np.ones(5, np.int64)]}
    out = collate(batch, "cpu", ())
    assert out["prompt_embeds"].shape == (2, 5, 4) and out["prompt_embeds_mask"].tolist()[0] == [1, 1, 0, 0, 0]


def test_the_encoder_loads_everything_but_the_trainable_model(make_config):
    encoder = Encoder(make_config(data={"preprocess": "stream"}))
    assert encoder.pipe.pipe.transformer is None and encoder.pipe.pipe.vae is not None
    assert [u.name for u in encoder.units] == ["shape_check", "prompt_embedder", "input_image_embedder"]


def shard_mtimes(cache):
    shards = os.path.join(cache, "shards")
    return {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in sorted(os.listdir(shards))}


@pytest.mark.slow
def test_cache_is_written_once_resumes_and_rebuilds_when_inputs_change(ray_session, make_config, tmp_path, shapes,
                                                                      capsys):
    cfg = mode_config(make_config, tmp_path, "cache")
    cache = preprocess(cfg, shard_rows=6)  # 16 rows -> shards of 6, 6, 4
    manifest = json.loads(open(os.path.join(cache, "manifest.json")).read())
    assert manifest["complete"] and manifest["shards"] == [6, 6, 4] and manifest["num_samples"] == 16
    assert manifest["model"]["path"] == cfg.model.path and manifest["settings"]["height"] == 32
    assert os.path.exists(os.path.join(cache, "empty_prompt.parquet"))
    first = shard_mtimes(cache)
    assert list(first) == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    table = pq.read_table(os.path.join(cache, "shards", "shard-000000.parquet"))
    assert table.schema.field("latents").type == pa.binary() and table.column("latents#shape")[0].as_py() == [4, 16, 16]

    capsys.readouterr()
    preprocess(cfg, shard_rows=6)  # complete and unchanged: a no-op
    assert shard_mtimes(cache) == first and "encoding" not in capsys.readouterr().out

    # Interrupted: one shard missing, manifest not complete -> only that shard is written again.
    os.remove(os.path.join(cache, "shards", "shard-000001.parquet"))
    CacheLayout(cache).write_manifest({**manifest, "complete": False})
    preprocess(cfg, shard_rows=6)
    out = capsys.readouterr().out
    assert "resuming" in out and "encoding 6 samples into 1 cache shards" in out
    again = shard_mtimes(cache)
    assert again["shard-000000.parquet"] == first["shard-000000.parquet"] and len(again) == 3

    # A different size and a changed data file (size/mtime) invalidate the cache, and the message names each
    # change. One rebuild checks both: each rebuild starts an encoder actor (about 5 s here).
    os.utime(os.path.join(shapes, "0003.png"), ns=(1, 1))
    try:
        preprocess(mode_config(make_config, tmp_path, "cache", height=16, width=32), shard_rows=6)
        out = capsys.readouterr().out
        assert "is stale (settings.height: 32 -> 16; inputs: the data files or metadata changed)" in out
    finally:
        os.utime(os.path.join(shapes, "0003.png"))
    # The data file alone changes the cache's identity in its inputs only.
    cfg = mode_config(make_config, tmp_path, "cache")
    rows = read_rows(cfg.data)[0]
    before = cache_identity(cfg, rows, shard_rows=6)
    os.utime(os.path.join(shapes, "0003.png"), ns=(1, 1))
    try:
        after = cache_identity(cfg, rows, shard_rows=6)
    finally:
        os.utime(os.path.join(shapes, "0003.png"))
    assert describe_changes(before, after) == "inputs: the data files or metadata changed"


def test_caption_dropout_swaps_in_the_empty_prompt_per_seed_epoch_and_sample(make_config):
    cfg = make_config(data={"preprocess": "stream"})
    empty = encode_empty_prompt(to_remote(cfg))
    assert set(empty) == {"prompt_embeds", "pooled_prompt_embeds", "text_ids:shared"}
    n = 64
    batch = {"prompt": [f"p{i}" for i in range(n)], "_row": np.arange(n), "_rep": np.zeros(n, np.int64),
             "prompt_embeds": np.ones((n, 16, 32), np.float32), "pooled_prompt_embeds": np.ones((n, 32), np.float32),
             "text_ids:shared": np.zeros((n, 16, 3), np.float32)}
    dropout = CaptionDropout(0.25, seed=0, empty=empty)
    out = dropout(batch, epoch=0)
    dropped = [i for i in range(n) if out["prompt"][i] == ""]
    assert 4 <= len(dropped) <= 28 and dropped == [i for i in range(n) if caption_dropped(0.25, 0, 0, i, 0)]
    assert all(np.array_equal(out["prompt_embeds"][i], empty["prompt_embeds"][0]) for i in dropped)
    assert all(out["prompt_embeds"][i].min() == 1 for i in range(n) if i not in dropped)
    assert dropped != [i for i in range(n) if dropout(batch, epoch=1)["prompt"][i] == ""]  # re-drawn each epoch
    inline = CaptionDropout(0.25, seed=0)({"prompt": batch["prompt"], "_row": batch["_row"], "_rep": batch["_rep"]}, 0)
    assert [i for i in range(n) if inline["prompt"][i] == ""] == dropped  # inline mode drops the same samples


def test_random_flip_is_fixed_per_sample_and_applied_in_the_decode_stage(make_config):
    cfg = make_config()
    rows, _ = read_rows(cfg.data)
    plain = DecodeRow(cfg.data, seed=0)
    flip = DecodeRow(cfg.data.model_copy(update={"random_flip": True}), seed=0)
    picked = [r["_row"] for r in rows if flipped(0, r["_row"])]
    assert 0 < len(picked) < len(rows)
    for r in rows[:6]:
        a, b = plain(r)[0]["image"], flip(r)[0]["image"]
        assert np.array_equal(b, a[:, ::-1] if r["_row"] in picked else a)


@pytest.mark.slow
def test_stream_mode_encodes_the_empty_prompt_in_the_eval_task(ray_session, make_config, tmp_path):
    """With caption dropout and an eval set, one task loads the text encoders for both (on a real model a load of
    several GB, and on GPUs a second task waiting for the encoders' GPU)."""
    from raydiff.launch.trainer import plan_run

    cfg = mode_config(make_config, tmp_path, "stream", caption_dropout=0.5)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"holdout": 2})})
    args = plan_run(cfg).args
    assert args.empty_prompt.task_id() == args.eval_set.task_id()  # two returns of one task
    empty, alone = ray.get(args.empty_prompt), encode_empty_prompt(to_remote(cfg))
    assert empty.keys() == alone.keys() and all(np.array_equal(empty[k], alone[k]) for k in alone)
    assert [s["_row"] for s in ray.get(args.eval_set)] == [14, 15] and "latents" in ray.get(args.eval_set)[0]


@pytest.mark.slow
def test_cache_mode_keeps_the_encoded_eval_set_in_the_cache(ray_session, make_config, tmp_path):
    """Encoded once, stamped with what it was encoded from: a later run's eval set comes from the cache (no
    encoder task), until the model, the settings or an eval row changes; a skipped bad row is never cached,
    since each run counts it."""
    cfg = mode_config(make_config, tmp_path, "cache")
    rows = read_rows(cfg.data)[0][12:]
    layout = CacheLayout(cfg.data.cache_dir)
    identity = eval_identity(cfg, rows)
    encoded, _ = eval_samples(to_remote(cfg), rows, cache_identity=identity)  # what the eval task runs
    cached = read_eval_set(layout, identity)
    assert [s["_row"] for s in cached] == [12, 13, 14, 15] and cached[0].keys() == encoded[0].keys()
    for got, want in zip(cached, encoded):  # (the codec stores a scalar as shape (1,), as in the shards)
        assert all(np.array_equal(np.ravel(got[k]), np.ravel(want[k])) for k in want)
    written = os.stat(layout.uri(layout.eval_set())).st_mtime_ns
    again = ray.get(start_eval_set(cfg, rows).samples)  # from the cache, not encoded (and written) again
    assert [s["_row"] for s in again] == [12, 13, 14, 15]
    assert os.stat(layout.uri(layout.eval_set())).st_mtime_ns == written
    assert all(np.array_equal(a["latents"], b["latents"]) for a, b in zip(again, encoded))

    assert read_eval_set(layout, eval_identity(mode_config(make_config, tmp_path, "cache", height=16), rows)) is None
    assert read_eval_set(layout, eval_identity(cfg, [{**rows[0], "prompt": "another"}, *rows[1:]])) is None
    os.utime(rows[0]["image"], ns=(1, 1))
    try:
        assert read_eval_set(layout, eval_identity(cfg, rows)) is None  # the file changed
    finally:
        os.utime(rows[0]["image"])

    layout.clear()  # a stale cache goes with its eval set
    assert not layout.exists(layout.eval_set())
    bad = mode_config(make_config, tmp_path, "cache", skip_bad_samples=True)
    missing = [*rows[:3], {**rows[3], "image": str(tmp_path / "missing.png")}]
    samples, _ = eval_samples(to_remote(bad), missing, cache_identity=eval_identity(bad, missing))
    assert len(samples) == 3 and not layout.exists(layout.eval_set())


@pytest.mark.slow
def test_stream_mode_eval_set_arrives_encoded_in_file_order(ray_session, make_config, tmp_path):
    cfg = mode_config(make_config, tmp_path, "stream", random_flip=True)
    rows, _ = read_rows(cfg.data)
    samples = ray.get(start_eval_set(cfg, rows[:5]).samples)
    assert [s["_row"] for s in samples] == [0, 1, 2, 3, 4] and "image" not in samples[0]
    # As the loop's EvalSet batches rows: lists per column, media (none here) stacked.
    columns = {k: [s[k] for s in samples[:2]] for k in samples[0]}
    out = collate(columns, "cpu", cfg.data.data_file_keys)
    assert out["latents"].shape == (2, 4, 16, 16) and out["text_ids"].shape == (16, 3) and out["height"] == 32
