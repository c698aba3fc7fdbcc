"""The config contract: defaults in one place, typos and bad values rejected with the key named."""

from pathlib import Path

import pytest

from raydiff.config import ConfigError, load_config, parse_config

BASE = {"model": {"path": "m"}, "data": {"metadata_path": "d/metadata.csv"}}
EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/*/*.yaml"))


def test_minimal_config_gets_documented_defaults():
    cfg = parse_config(BASE)
    assert cfg.model.family == "flux" and cfg.train.learning_rate == 1e-4 and cfg.lora.rank == 8
    assert cfg.loss.timestep_sampling == "diffsynth" and cfg.ray.num_workers == 2


def test_typo_names_the_key_and_suggests_the_fix():
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "lora": {"rnak": 4}})
    assert "lora.rnak: unknown key; did you mean 'rank'?" in str(err.value)


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.lr_scheduler: .*'cosine'.*\(got 'cosin'\)"):
        parse_config({**BASE, "train": {"lr_scheduler": "cosin"}})
    with pytest.raises(ConfigError, match=r"train.learning_rate: .*greater than 0"):
        parse_config({**BASE, "train": {"learning_rate": -1}})


def test_unknown_section_and_missing_required_key():
    with pytest.raises(ConfigError, match="trian: unknown key; did you mean 'train'"):
        parse_config({**BASE, "trian": {}})
    with pytest.raises(ConfigError, match="model.path: required key is missing"):
        parse_config({"model": {}, "data": {"metadata_path": "x"}})


def test_height_without_width_is_refused():
    with pytest.raises(ConfigError, match="height and data.width must be set together"):
        parse_config({**BASE, "data": {"metadata_path": "x", "height": 64}})


def test_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ndata: {metadata_path: d.csv}\n")
    cfg = load_config(path, ["train.learning_rate=3e-4", "lora.target_modules=[to_q, to_k]", "ray.num_to_keep=null"])
    assert cfg.train.learning_rate == 3e-4 and cfg.lora.target_modules == ["to_q", "to_k"]
    assert cfg.ray.num_to_keep is None
    assert Path(cfg.data.metadata_path).is_absolute() and Path(cfg.ray.storage_path).is_absolute()
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(path, ["train.learning_rate"])


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        parse_config({**BASE, "lora": None})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_are_valid(path):
    load_config(path)


def test_preprocess_options_that_cannot_work_together_are_refused():
    for data, message in [({"preprocess": "cache"}, "needs data.cache_dir"),
                          ({"buckets": True, "height": 32, "width": 32}, "unset data.height/width"),
                          ({"caption_dropout": 1.5}, "less than or equal to 1")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, "data": {"metadata_path": "x", **data}})
    with pytest.raises(ConfigError, match="raydiff sample"):
        parse_config({**BASE, "data": {"metadata_path": "x", "preprocess": "stream"},
                      "validation": {"prompts": ["a cat"]}})


def test_adapter_type_and_lokr_factor_are_checked():
    base = {"model": {"path": "m"}, "data": {"metadata_path": "d.csv"}}
    assert parse_config(base).lora.type == "lora" and parse_config(base).lora.lokr_factor == -1
    assert parse_config({**base, "lora": {"type": "lokr", "lokr_factor": 16}}).lora.type == "lokr"
    with pytest.raises(ConfigError, match=r"lora.type: Input should be 'lora', 'dora', 'lokr' or 'loha'"):
        parse_config({**base, "lora": {"type": "ia3"}})
    with pytest.raises(ConfigError, match="lora.lokr_factor: must be -1"):
        parse_config({**base, "lora": {"lokr_factor": 0}})
