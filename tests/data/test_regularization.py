"""Regularization (prior preservation) data: a second metadata file mixed into training at a ratio, its
samples' loss weighted and logged apart (`reg_loss`)."""

from collections import Counter

import pytest
import torch

from raydiff.config import ConfigError, parse_config
from raydiff.data.cache_io import RepeatCached
from raydiff.data.metadata import BadSample, SampleError, is_regularization, reg_id, train_and_eval_rows
from raydiff.data.shapes import write_shapes_dataset
from raydiff.training.hooks import LogWindow
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import Stepper, build_optimizer


@pytest.fixture
def reg_data(tmp_path):
    path = tmp_path / "reg"
    write_shapes_dataset(str(path), n=5)
    return str(path)


def config(shapes, reg_data, **reg):
    return parse_config({"model": {"path": "m"},
                         "data": {"base_path": shapes, "metadata_path": f"{shapes}/metadata.csv",
                                  "regularization": {"metadata_path": f"{reg_data}/metadata.csv",
                                                     "base_path": reg_data, **reg}}})


@pytest.mark.parametrize("ratio,expected", [(0.2, [1, 1, 1, 1]), (0.5, [4, 3, 3, 3, 3])])
def test_a_ratio_share_of_the_epoch_comes_from_the_regularization_rows(shapes, reg_data, ratio, expected):
    cfg = config(shapes, reg_data, ratio=ratio)
    train, _, _ = train_and_eval_rows(cfg.data, cfg.eval)  # 16 training rows
    reg = [r for r in train if r["_row"] < 0]
    assert len(train) - len(reg) == 16 and len(reg) == round(ratio / (1 - ratio) * 16)
    assert sorted(Counter(r["_row"] for r in reg).values(), reverse=True) == expected
    assert all(r["image"].startswith(reg_data) for r in reg)
    assert train == train_and_eval_rows(cfg.data, cfg.eval)[0]  # the same rows every run


def test_regularization_rows_are_marked_and_named_in_errors(shapes, reg_data):
    largest_sharded_id = ((2**31 - 1) << 32) + 2**32 - 1  # shard_id << 32 | record
    assert is_regularization([0, 5, largest_sharded_id, reg_id(0), reg_id(3)]).tolist() == [0, 0, 0, 1, 1]
    assert str(BadSample(reg_id(3), "x.png", "empty")) == "regularization row 3, file 'x.png': empty"
    # A sharded sample's id means nothing to a user; its reason names the shard and record instead.
    assert str(BadSample(largest_sharded_id, "x.png", "empty (shard s.parquet, record 3)")) == \
        "file 'x.png': empty (shard s.parquet, record 3)"
    with open(f"{reg_data}/metadata.csv", "a") as f:
        f.write("missing.png,a ghost\n")
    cfg = config(shapes, reg_data)
    with pytest.raises(SampleError, match="regularization row 5, file 'missing.png': file not found"):
        train_and_eval_rows(cfg.data, cfg.eval)


def test_regularization_is_checked_and_its_paths_resolved(tmp_path):
    raw = {"model": {"path": "m"}, "data": {"metadata_path": "shards/", "regularization": {"metadata_path": "r.csv"}}}
    with pytest.raises(ConfigError, match="data.regularization.*not available with sharded data"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="ratio"):
        parse_config({"model": {"path": "m"}, "data": {"metadata_path": "a.csv",
                                                       "regularization": {"metadata_path": "r.csv", "ratio": 1}}})
    cfg = parse_config({"model": {"path": "m"}, "data": {"metadata_path": "a.csv", "regularization": {
        "metadata_path": "reg/m.csv", "base_path": "reg"}}}).resolved_paths(tmp_path)
    assert cfg.data.regularization.metadata_path == str(tmp_path / "reg/m.csv")
    assert cfg.data.regularization.base_path == str(tmp_path / "reg")


def test_cached_regularization_samples_get_their_own_copies():
    repeat = RepeatCached(repeat=2, seed=0, copies={reg_id(0): 3, reg_id(1): 0})
    assert [c["_rep"] for c in repeat({"_row": 7})] == [0, 1]
    assert [c["_rep"] for c in repeat({"_row": reg_id(0)})] == [0, 1, 2]
    assert repeat({"_row": reg_id(1)}) == []


def test_the_step_weights_regularization_samples_and_tallies_them_apart(make_config, shapes):
    cfg = make_config(data={"regularization": {"metadata_path": f"{shapes}/metadata.csv", "base_path": shapes,
                                               "weight": 0.25}})
    module = PipelineTrainingModule(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=4)
    stepper = Stepper(cfg, module, optimizer, scheduler, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a", "b", "c"],
             "_regularization": torch.tensor([False, True, False])}
    with torch.no_grad():
        per_sample = module(batch, generator=stepper.generator(0, 0), per_sample=True)
    result = stepper.step([batch], 0)
    assert result.loss == pytest.approx(float((per_sample * torch.tensor([1, 0.25, 1])).mean()), rel=1e-5)
    assert result.tallies["loss"] == (pytest.approx(float(per_sample[[0, 2]].sum()), rel=1e-5), 2)
    assert result.tallies["reg_loss"] == (pytest.approx(float(per_sample[1]), rel=1e-5), 1)
    window = LogWindow()
    window.add(result)
    means = window.means(world=1, device="cpu")
    assert means == {"loss": pytest.approx(float(per_sample[[0, 2]].mean()), rel=1e-5),
                     "reg_loss": pytest.approx(float(per_sample[1]), rel=1e-5)}
    plain = stepper.step([{k: v for k, v in batch.items() if k != "_regularization"}], 1)
    assert plain.tallies["reg_loss"] == (0.0, 0) and plain.tallies["loss"][1] == 3
