"""`raydiff tune`: the `tune:` section's checks, and on one 2-core machine 4 trials under ASHA with the
trials table and best/, through the CLI on its own local Ray (which goes through `raydiff.tune`)."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray.tune
import torch

from raydiff.config import ConfigError, load_config, parse_config
from raydiff.launch.tune import search_space, trial_config
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": {"path": "m"}, "data": {"metadata_path": "d/metadata.csv"},
        "eval": {"holdout": 2, "every_steps": 2}, "train": {"save_steps": 4}}


def with_tune(**tune_section) -> dict:
    return {**BASE, "tune": tune_section}


@pytest.mark.parametrize("tune_section, message", [
    ({"param_space": {"train.learnig_rate": {"loguniform": [1e-5, 1e-3]}}},
     "unknown config key 'train.learnig_rate'; did you mean 'train.learning_rate'?"),
    ({"param_space": {"lora.rank": {"pick": [4, 8]}}}, "tune.param_space.lora.rank: expected one of loguniform"),
    ({"param_space": {"lora.rank": {"quniform": [4, 8]}}}, "quniform takes 3 numbers"),
    ({"param_space": {"ray.name": {"choice": ["a", "b"]}}}, "'ray.name' is set by `raydiff tune` itself"),
    ({"search_alg": "grid", "param_space": {"train.learning_rate": {"uniform": [1e-5, 1e-3]}}},
     "search_alg grid samples nothing"),
])
def test_tune_section_errors_name_the_key(tune_section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(with_tune(**tune_section))


def test_eval_loss_needs_an_eval_every_report():
    with pytest.raises(ConfigError, match="tune.metric eval_loss needs eval.every_steps"):
        parse_config({**with_tune(), "eval": {}})
    with pytest.raises(ConfigError, match=r"train.save_steps \(3\) must be a multiple of eval.every_steps \(2\)"):
        parse_config({**with_tune(), "train": {"save_steps": 3}})


def test_values_the_config_refuses_fail_before_tune_starts():
    cfg = parse_config(with_tune())
    with pytest.raises(ConfigError, match=r"tune.param_space.lora.rank: the value 0 is refused(.|\n)*lora.rank"):
        search_space(cfg, {"lora.rank": {"choice": [4, 0]}})
    with pytest.raises(ConfigError, match="tune.param_space.train.learning_rate: uniform needs low < high"):
        search_space(cfg, {"train.learning_rate": {"uniform": [1e-3, 1e-5]}})
    with pytest.raises(ConfigError, match="tune.param_space is empty"):
        search_space(cfg, {})


def test_tune_can_search_the_adapter_type():
    cfg = parse_config(with_tune())
    space = search_space(cfg, {"lora.type": {"choice": ["lora", "dora", "lokr", "loha"]}})
    assert space["lora.type"].categories == ["lora", "dora", "lokr", "loha"]
    assert trial_config(cfg, {"lora.type": "lokr"}, "t1").lora.type == "lokr"
    with pytest.raises(ConfigError, match=r"tune.param_space.lora.type: the value 'ia3' is refused"):
        search_space(cfg, {"lora.type": {"grid_search": ["lora", "ia3"]}})


def test_yaml_distributions_become_tune_domains_and_trials_get_their_own_config():
    cfg = load_config(ROOT / "examples" / "tune" / "lora_flux_dev_search.yaml")
    space = search_space(cfg, cfg.tune.param_space)
    lr, rank = space["train.learning_rate"], space["lora.rank"]
    assert isinstance(lr.get_sampler(), ray.tune.search.sample.Float._LogUniform)
    assert (lr.lower, lr.upper) == (2e-5, 4e-4) and rank.categories == [8, 16, 32]
    grid = parse_config(with_tune(search_alg="grid", param_space={"lora.rank": {"choice": [4, 8]}}))
    assert search_space(grid, grid.tune.param_space) == {"lora.rank": {"grid_search": [4, 8]}}

    trial = trial_config(cfg, {"train.learning_rate": 1e-05, "lora.rank": 32}, "abc12_00003")
    assert trial.train.learning_rate == 1e-5 and trial.lora.rank == 32 and trial.tune is None
    assert trial.ray.name == "flux-dev-search-abc12_00003"


def far_off_lora(cfg, directory: Path) -> str:
    """A rank-4 LoRA with large random weights: its loss is ~0.2 above the base model's, where 4 steps of
    training move the eval loss by ~0.001."""
    module = PipelineTrainingModule(cfg)
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data.normal_(0, 0.5)
    save_lora(str(directory), module.trainable_state_dict(), module.lora_config)
    return str(directory)


@pytest.mark.slow
def test_cli_asha_search_of_the_tiny_example_writes_trials_table_and_stops_a_bad_trial(make_config, tmp_path):
    """`raydiff tune examples/tune/tiny.yaml` as the README runs it, on its own local Ray (a new one next to the
    session's), pointed at the session's tiny model and data, 3 trials under ASHA.

    2 concurrent trials x (1 worker x 0.5 CPU + a 0.01-CPU driver) fit a local Ray's 4 logical CPUs next to the
    Ray Data decode tasks (Ray Train's multi-worker path is tested elsewhere). Reports at steps 1-4 (eval every
    step, checkpoints at 2 and 4). Which learning rate wins after 4 tiny steps is noise, so the last trial starts
    from a far-off LoRA: the grid runs [fresh, fresh, far-off], the two fresh trials run together, and the far-off
    one starts only when one of them has finished, so it reaches ASHA's first rung after a much lower eval loss
    was recorded there, and ASHA stops it.
    """
    cfg = make_config("search", train={"max_steps": 4, "save_steps": 2},
                      eval={"holdout": 2, "every_steps": 1, "num_sigmas": 2},
                      ray={"num_workers": 1, "cpus_per_worker": 0.5})
    far_off = far_off_lora(cfg, tmp_path / "far-off")
    space = {"lora.init_from": {"grid_search": [None, None, far_off]},
             "train.learning_rate": {"loguniform": [1e-5, 1e-3]}}
    overrides = [f"model.path={cfg.model.path}", f"data.base_path={cfg.data.base_path}",
                 f"data.metadata_path={cfg.data.metadata_path}", f"ray.storage_path={cfg.ray.storage_path}",
                 "train.max_steps=4", "train.save_steps=2", "eval.holdout=2", "eval.every_steps=1", "eval.num_sigmas=2",
                 "lora.rank=4", "ray.num_workers=1", "ray.cpus_per_worker=0.5", "ray.name=search",
                 f"tune.param_space={json.dumps(space)}", "tune.num_samples=1", "tune.max_concurrent_trials=2",
                 "tune.grace_period=1", "tune.reduction_factor=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    example = str(ROOT / "examples" / "tune" / "tiny.yaml")
    proc = subprocess.run([sys.executable, "-m", "raydiff.launch.cli", "tune", example,
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=tmp_path, env=env, timeout=400, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best trial" in proc.stdout

    experiment = Path(cfg.ray.storage_path, "search")
    rows = list(csv.DictReader((experiment / "trials.csv").open()))
    assert len(rows) == 3 and all(1e-5 <= float(r["train.learning_rate"]) <= 1e-3 for r in rows)
    assert not [r for r in rows if r["status"] == "error" or r["error"]]
    fresh = [r for r in rows if r["lora.init_from"] == ""]
    assert len(fresh) == 2
    # Two fresh trials differ only by learning rate, so ASHA may stop either; what is certain is that the
    # far-off trial, reaching a rung after a fresh one, is stopped early, and every finished trial is complete.
    for row in rows:
        if row["status"] == "completed":
            assert row["last_step"] == "4" and row["reports"] == "4"
            assert row["checkpoint"] == str(Path(cfg.ray.storage_path, f"search-{row['trial_id']}",
                                                 "checkpoint-000004"))
        else:
            assert row["status"] == "stopped" and int(row["last_step"]) < 4
    assert any(r["status"] == "stopped" and r["lora.init_from"] == far_off for r in rows)

    # best/ is a copy of the final checkpoint of the trial with the lowest eval loss, a fresh one.
    best = min((r for r in rows if r["checkpoint"]), key=lambda r: float(r["best_eval_loss"]))
    assert best in fresh
    assert sorted(os.listdir(experiment / "best")) == sorted(os.listdir(best["checkpoint"]))
    assert "pytorch_lora_weights.safetensors" in os.listdir(experiment / "best")
    assert json.loads((experiment / "best" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_failed_trial_gets_one_line_with_the_last_line_of_its_error(ray_session, tmp_path, capsys):
    """Tune's own Trial, its error stored as Tune stores it (Trial has no `error_msg` in Ray 2.5x/2.6x)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from raydiff.launch.tune import TrialLines

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="search", trial_dir_name="t1")
    trial = Trial("raydiff", config={"train.learning_rate": 1e-3}, stub=True, storage=storage)
    trial.init_local_path()
    trial.handle_error(ValueError("Traceback ...\nValueError: the eval task found no CPU"))
    TrialLines(["train.learning_rate"]).on_trial_error(0, [trial], trial)
    out = capsys.readouterr().out
    assert out == f"[raydiff] trial {trial.trial_id} failed: ValueError: the eval task found no CPU\n"


def start_in_trial(cfg, rows) -> tuple[dict, list]:
    """What a Tune trial's driver does before its fit: start the empty prompt's and the eval set's tasks. A trial
    driver runs inside a placement group that holds only its own 0.01 CPU and captures its child tasks."""
    from raydiff.data.encode import start_empty_prompt
    from raydiff.data.eval_set import start_eval_set

    return ray.get(start_empty_prompt(cfg)), ray.get(start_eval_set(cfg, rows).samples)


def test_tasks_a_trial_driver_starts_run_outside_its_placement_group(ray_session, make_config):
    """Stream mode's empty-prompt task and the eval task, started from inside a Tune trial's placement group,
    which cannot hold them (before, `raydiff tune` with caption dropout in stream mode failed on this)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raydiff.data.metadata import read_rows

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import test modules
    cfg = make_config(data={"preprocess": "stream", "caption_dropout": 0.5, "encoder_num_cpus": 0.5})
    rows = read_rows(cfg.data)[0][:2]
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())
    try:
        inside = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        empty, samples = ray.get(ray.remote(start_in_trial).options(num_cpus=0.01, scheduling_strategy=inside)
                                 .remote(cfg, rows), timeout=120)
    finally:
        remove_placement_group(group)
    assert empty["prompt_embeds"].shape[0] == 1
    assert [s["_row"] for s in samples] == [r["_row"] for r in rows] and "latents" in samples[0]
