"""Reliability through real Ray runs: exact resume, a killed worker, non-finite steps."""

import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from conftest import final, tiny_config  # noqa: E402  (pytest puts tests/ on sys.path)

from raydiff.data.shapes import write_shapes_dataset
from raydiff.launch.trainer import launch_training_task
from raydiff.training.module import PipelineTrainingModule

pytestmark = pytest.mark.slow
# Ray workers cannot import test modules: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])



def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def resume_case(ray_session, tiny_model, shapes, tmp_path_factory):
    """(config maker, the uninterrupted run's final state and LoRA) for the stop/resume and killed-worker tests,
    which must both reproduce it: 2 workers, batch 1, 16 samples + 4 regularization samples (10 steps per epoch),
    11 steps (into the second epoch), checkpoints every 2 steps (all kept), 64x64 images so that steps are slow
    enough to kill a worker between checkpoints. Trained once, uninterrupted."""
    root = tmp_path_factory.mktemp("reliability")
    write_shapes_dataset(str(root / "reg"), n=4, seed=3)
    reg = {"metadata_path": str(root / "reg" / "metadata.csv"), "base_path": str(root / "reg"), "ratio": 0.2}

    def cfg(name, steps=11):
        return tiny_config(tiny_model("flux"), shapes, str(root / "runs"), name,
                           data={"height": 64, "width": 64, "regularization": reg},
                           train={"max_steps": steps, "save_steps": 2, "num_epochs": 3},
                           ray={"num_workers": 2, "max_failures": 1, "num_to_keep": None})

    return cfg, final(launch_training_task(cfg("whole")))


def test_stop_and_resume_gives_bitwise_the_same_lora(resume_case, capsys):
    """A run stopped after a checkpoint mid-epoch and resumed equals the uninterrupted run, bitwise
    (CPU, deterministic kernels): data position (regularization samples mixed in), optimizer state and
    per-step noise all continue."""
    cfg, (whole_state, whole) = resume_case
    # A run that stopped after step 4, mid-epoch: the whole run's checkpoint-000004 in its own run directory
    # (one Ray run fewer than stopping a run there; test_recipes.py does the same).
    storage = Path(cfg("whole").ray.storage_path)
    shutil.copytree(storage / "whole" / "checkpoint-000004", storage / "split" / "checkpoint-000004")
    capsys.readouterr()
    split_state, split = final(launch_training_task(cfg("split")))
    assert "continuing from checkpoint-000004 (step 4)" in capsys.readouterr().out
    assert [h["step"] for h in split_state["log_history"]] == list(range(1, 12))
    for key in ("loss", "reg_loss"):
        assert [h.get(key) for h in split_state["log_history"]] == [h.get(key) for h in whole_state["log_history"]]
    assert any(h.get("reg_loss") for h in whole_state["log_history"])
    assert_same_weights(whole, split)


def kill_a_worker_after(checkpoint_dir: Path, killed: list):
    """Wait for `checkpoint_dir`, then SIGKILL one training worker process (as a node loss would). Only this
    session's: the local Ray that `ray.init` started runs below this process, another raydiff run beside it not."""
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint_dir / "trainer_state.json").exists():
        time.sleep(0.02)
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                return
        except psutil.NoSuchProcess:
            continue


def test_a_killed_worker_restarts_and_the_run_finishes_as_if_uninterrupted(resume_case):
    cfg, (_, whole) = resume_case
    run = cfg("kill")
    killed = []
    killer = threading.Thread(target=kill_a_worker_after,
                              args=(Path(run.ray.storage_path, "kill", "checkpoint-000004"), killed))
    killer.start()
    state, weights = final(launch_training_task(run))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert state["global_step"] == 11
    assert [h["step"] for h in state["log_history"]] == list(range(1, 12))  # no gap, no duplicate
    assert_same_weights(whole, weights)


class NaNAfter(PipelineTrainingModule):
    """A module whose loss turns NaN from its `start`-th call on (for `count` calls)."""

    def __init__(self, cfg, device, start, count):
        super().__init__(cfg, device=device)
        self.calls, self.start, self.count = 0, start, count

    def forward(self, data, generator=None):
        self.calls += 1
        loss = super().forward(data, generator)
        return loss * float("nan") if self.start <= self.calls < self.start + self.count else loss


def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(ray_session, make_config):
    cfg = make_config("nan", train={"max_steps": 5, "max_bad_steps": 3}, ray={"num_workers": 0})  # local mode
    state, _ = final(launch_training_task(cfg, module_factory=lambda d: NaNAfter(cfg, d, start=2, count=2)))
    assert state["global_step"] == 5 and state["bad_steps"] == 2
    assert all(h["loss"] == h["loss"] for h in state["log_history"][2:])  # finite after the bad steps

    cfg = make_config("nan-stop", train={"max_steps": 8, "save_steps": 1, "max_bad_steps": 3}, ray={"num_workers": 0})
    with pytest.raises(Exception) as err:
        launch_training_task(cfg, module_factory=lambda d: NaNAfter(cfg, d, start=3, count=100))
    message = str(err.value) + "".join(str(e) for e in getattr(err.value, "worker_failures", {}).values())
    assert "3 consecutive steps with non-finite loss or gradients at step 3" in message
    assert "last good checkpoint: checkpoint-000002" in message


class CrashOnSecondSave(PipelineTrainingModule):
    """Dies while writing its second checkpoint, after the LoRA file is already on disk."""

    saves = 0

    def trainable_state_dict(self):
        self.saves += 1
        if self.saves == 2:
            raise OSError("disk full (simulated) while writing the checkpoint")
        return super().trainable_state_dict()


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint_as_resume_point(ray_session, make_config):
    """Local mode: the checkpoint is written and stored by the same code as on workers (StepHooks), and the
    failure path of a run on workers is the killed-worker test's."""
    cfg = make_config("torn", train={"max_steps": 6, "save_steps": 2}, ray={"num_workers": 0})
    with pytest.raises(Exception, match="disk full"):
        launch_training_task(cfg, module_factory=lambda d: CrashOnSecondSave(cfg, d))
    run = Path(cfg.ray.storage_path, "torn")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002"]  # nothing half-written

    state, _ = final(launch_training_task(cfg))  # the same name resumes from step 2
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"]] == list(range(1, 7))
