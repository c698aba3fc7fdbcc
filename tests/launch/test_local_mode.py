"""`ray.num_workers: 0`, Ray Train's local mode: the loop runs in the calling process on the data Ray Data
streams to it, and raydiff stores the checkpoints itself. It must train what one Ray worker trains, keep
`ray.num_to_keep` complete checkpoints and resume from the newest as a run on workers does."""

from pathlib import Path

import numpy as np
import pytest
from conftest import final  # noqa: E402  (pytest puts tests/ on sys.path)

from raydiff.config import ConfigError
from raydiff.launch import trainer
from raydiff.launch.trainer import launch_training_task
from raydiff.launch.tune import tune
from raydiff.training.checkpoint_store import store_checkpoint


def test_local_mode_trains_what_one_worker_trains_and_resumes_like_it(one_worker_run, make_config, capsys,
                                                                     monkeypatch):
    train = {"max_steps": 4, "save_steps": 1}
    on_worker = one_worker_run[2:]  # the same 4 steps on one Ray Train worker (its checkpoints at 2 and 4)
    capsys.readouterr()

    def no_relay(*args, **kwargs):
        raise AssertionError("local mode prints in its own process; it needs no console relay actor")

    monkeypatch.setattr(trainer, "DriverConsole", no_relay)
    result = launch_training_task(make_config("local", train=train, ray={"num_workers": 0, "num_to_keep": 2}))
    out = capsys.readouterr().out
    assert "in this process (local mode)" in out
    assert "[raydiff] step 4/4" in out  # the loop's own lines, printed here
    local = final(result)
    assert [h["loss"] for h in local[0]["log_history"]] == [h["loss"] for h in on_worker[0]["log_history"]]
    assert local[1].keys() == on_worker[1].keys()
    for key in local[1]:
        np.testing.assert_array_equal(local[1][key], on_worker[1][key])

    # Stored like Ray's: under <storage>/<name>, marked complete, the newest ray.num_to_keep kept.
    run = Path(result.path)
    assert run == Path(make_config().ray.storage_path) / "local"
    assert Path(result.checkpoint.path) == run / "checkpoint-000004"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]
    assert all((p / ".raydiff-complete").is_file() for p in run.glob("checkpoint-*"))

    # A re-run with more steps continues from step 4 and ends where an uninterrupted 6-step run ends.
    longer = {"max_steps": 6, "save_steps": 1}
    resumed = final(launch_training_task(make_config("local", train=longer, ray={"num_workers": 0})))
    assert "continuing from checkpoint-000004 (step 4)" in capsys.readouterr().out
    whole = final(launch_training_task(make_config("local-whole", train=longer, ray={"num_workers": 0})))
    assert [h["step"] for h in resumed[0]["log_history"]] == list(range(1, 7))
    assert [h["loss"] for h in resumed[0]["log_history"]] == [h["loss"] for h in whole[0]["log_history"]]
    for key in whole[1]:
        np.testing.assert_array_equal(resumed[1][key], whole[1][key])


def test_what_local_mode_cannot_do_is_refused_before_ray_starts(make_config):
    with pytest.raises(ConfigError, match="raydiff tune runs every trial on Ray Train workers"):
        tune(make_config("tune-local", ray={"num_workers": 0}), {"train.learning_rate": {"choice": [1e-3]}})
    with pytest.raises(ValueError, match="ray.strategy fsdp shards across workers"):
        make_config("fsdp-local", lora=None, train={"trainable_models": ["transformer"]},
                    ray={"num_workers": 0, "strategy": "fsdp"})
    with pytest.raises(ValueError, match="ray.max_failures restarts failed workers; ray.num_workers 0 trains in"):
        make_config("restarts-local", ray={"num_workers": 0, "max_failures": 2})


def test_local_checkpoints_keep_the_new_one_and_leave_a_newer_leftover(tmp_path):
    """ray.num_to_keep counts the checkpoints before the one just stored, which is never deleted; an unfinished
    newer directory (a run stopped while uploading) is left to be overwritten when the run reaches it."""
    import pyarrow.fs as pafs

    run = tmp_path / "run"
    (run / "checkpoint-000009").mkdir(parents=True)  # a leftover, not marked complete
    written = tmp_path / "written"
    written.mkdir()
    (written / "trainer_state.json").write_text("{}")
    for step in (3, 4, 5):
        store_checkpoint(str(written), (pafs.LocalFileSystem(), str(run)), step, keep=2)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000005",
                                                                 "checkpoint-000009"]
    store_checkpoint(str(written), (pafs.LocalFileSystem(), str(run)), 6, keep=1)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000006", "checkpoint-000009"]
    assert (run / "checkpoint-000006" / ".raydiff-complete").is_file()
    assert (run / "checkpoint-000006" / "trainer_state.json").read_text() == "{}"
