"""Sharded data through real Ray workers: each rank streams its share of unequal shards, ranks train the
same number of batches, and a run resumed from the middle of a shard equals the uninterrupted one; sharded
data encoded into a cache by `raydiff preprocess`."""

import csv
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import final  # noqa: E402  (pytest puts tests/ on sys.path)

from raydiff.data.shapes import write_webdataset
from raydiff.launch.trainer import launch_training_task

pytestmark = pytest.mark.slow



def test_two_workers_stream_unequal_shards_and_resume_mid_shard_bitwise(ray_session, make_config, shapes, tmp_path,
                                                                        capsys):
    rows = list(csv.DictReader(open(os.path.join(shapes, "metadata.csv"))))
    embedded = [{"image": {"bytes": Path(shapes, r["image"]).read_bytes(), "path": r["image"]},
                 "prompt": r["prompt"]} for r in rows]  # Hugging Face datasets' image layout
    for k, (start, end) in enumerate(((0, 7), (7, 10), (10, 16))):
        (tmp_path / "shards").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(embedded[start:end]), tmp_path / "shards" / f"part-{k}.parquet")

    def cfg(name, steps):  # 16 samples / 2 workers / batch 2 = 4 steps an epoch; 6 steps cross into epoch 2
        return make_config(name, data={"metadata_path": str(tmp_path / "shards"), "shuffle_buffer": 3},
                           train={"max_steps": steps, "save_steps": 3, "num_epochs": 2, "batch_size": 2},
                           ray={"num_workers": 2})

    whole_state, whole = final(launch_training_task(cfg("whole", 6)))
    # A run that stopped after step 3, inside a shard of each rank's stream: the whole run's checkpoint-000003
    # in its own run directory (one Ray run fewer than stopping a run there; test_recipes.py does the same).
    storage = Path(make_config().ray.storage_path)
    shutil.copytree(storage / "whole" / "checkpoint-000003", storage / "split" / "checkpoint-000003")
    split_state, split = final(launch_training_task(cfg("split", 6)))
    assert "continuing from checkpoint-000003 (step 3)" in capsys.readouterr().out
    assert [h["step"] for h in split_state["log_history"]] == list(range(1, 7))
    assert [h["loss"] for h in split_state["log_history"]] == [h["loss"] for h in whole_state["log_history"]]
    assert split_state["positions"] == whole_state["positions"] and len(whole_state["positions"]) == 2
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_webdataset_shards_are_counted_in_ray_tasks_and_train(ray_session, make_config, tmp_path):
    write_webdataset(str(tmp_path / "wds"), [3, 5, 4])
    result = launch_training_task(make_config("wds", data={"metadata_path": str(tmp_path / "wds"),
                                                           "format": "webdataset"},
                                              train={"max_steps": 2}, ray={"num_workers": 0}))  # local mode
    state, _ = final(result)
    assert state["global_step"] == 2 and state["positions"] == [[0, 0, 0, 2]]  # pass 0, chunk at (0, 0), 2 taken


def test_webdataset_shards_preprocess_into_a_cache_then_train(ray_session, make_config, tmp_path, capfd):
    """`raydiff preprocess` of sharded data, then a cache-mode run that loads only the DiT. The shard writers are
    plain Ray actors: no Ray error line about actor arguments in the object store (ray-project/ray#53727)
    reaches the terminal."""
    import json

    import yaml

    from raydiff.config import to_dict
    from raydiff.launch.cli import main

    write_webdataset(str(tmp_path / "wds"), [3, 5, 4])
    cfg = make_config("wds-cache", data={"metadata_path": str(tmp_path / "wds"), "format": "webdataset",
                                         "preprocess": "cache", "cache_dir": str(tmp_path / "cache"),
                                         "encoder_num_cpus": 0.5},
                      train={"max_steps": 2}, ray={"num_workers": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    capfd.readouterr()
    main(["preprocess", str(tmp_path / "run.yaml")])
    out, err = capfd.readouterr()
    assert "encoding 3 of 3 shards into the cache" in out and "object store" not in err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and sorted(s["samples"] for s in manifest["sources"].values()) == [3, 4, 5]
    state, _ = final(launch_training_task(cfg))
    assert state["global_step"] == 2 and state["workers"][0]["models"] == ["transformer"]
