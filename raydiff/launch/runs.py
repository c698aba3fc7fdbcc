"""What the driver says about a run before it starts: how many steps it plans and which limit decides
that, where it resumes, and what changed in the config since that checkpoint.

A re-run with the same `ray.name` and `ray.storage_path` continues from the newest complete
checkpoint, whatever else changed: a different worker count, batch size or learning rate applies from
that step on (the data order then differs from an uninterrupted run). A run whose checkpoint already
reaches the planned steps trains nothing and says how to train more.
"""

from __future__ import annotations

import os

import ray.train

from raydiff.config import RaydiffConfig, to_dict
from raydiff.launch.storage import ResumePoint, config_changes, display_path, run_directory
from raydiff.training.loop_args import LoopArgs

# Differences that say nothing about training: where the run is stored and how it is shown.
_NOT_SETTINGS = ("ray.storage_path", "ray.address", "logging.progress_bar", "logging.verbose")


def step_limit(cfg: RaydiffConfig, args: LoopArgs) -> str:
    """Which of `train.max_steps` and `train.num_epochs` ends the run, in words."""
    t, per_epoch = cfg.train, args.steps_per_epoch
    epochs = f"train.num_epochs {t.num_epochs} x {per_epoch} steps per epoch"
    if t.max_steps is None:
        return epochs
    if t.max_steps < per_epoch * t.num_epochs:
        return f"train.max_steps {t.max_steps}; {epochs} would be {per_epoch * t.num_epochs}"
    if t.max_steps == per_epoch * t.num_epochs:
        return f"train.max_steps {t.max_steps} = {epochs}"
    return f"{epochs}; train.max_steps {t.max_steps} is not reached"


def describe_plan(cfg: RaydiffConfig, args: LoopArgs, resumed: ResumePoint | None) -> str:
    """One or two lines: the run's steps and their limit, and where it resumes with what changed."""
    r = cfg.ray
    where = f"on {r.num_workers} worker{'s' if r.num_workers > 1 else ''}"
    if r.local:
        where = "in this process (local mode)"
    line = f"[raydiff] run {r.name}: {args.total_steps} steps ({step_limit(cfg, args)}) {where}"
    if resumed is None:
        return line
    changes = [c for c in config_changes(resumed.config, to_dict(cfg)) if not c.startswith(_NOT_SETTINGS)]
    if resumed.step >= args.total_steps:
        return (f"{line}\n[raydiff] nothing to train: {os.path.basename(resumed.path)} is at step {resumed.step}, "
                f"which this config's {args.total_steps} steps do not pass; raise train.max_steps or "
                f"train.num_epochs to train on, or choose another ray.name to start afresh")
    line += f"\n[raydiff] continuing from {os.path.basename(resumed.path)} (step {resumed.step})"
    if changes:
        line += "; changed since then: " + ", ".join(changes)
    return line


def finished_result(cfg: RaydiffConfig, resumed: ResumePoint) -> ray.train.Result:
    """The Result of a run that has nothing left to train: its newest checkpoint, unchanged."""
    return stored_result(cfg, os.path.basename(resumed.path), {"step": resumed.step})


def stored_result(cfg: RaydiffConfig, checkpoint_dir: str, metrics: dict) -> ray.train.Result:
    """A Result naming the stored checkpoint `checkpoint_dir` of this run, as Ray Train returns after a run on
    workers (local mode's Result has no storage path, as Ray Train stores nothing there)."""
    r = cfg.ray
    fs, run_dir = run_directory(r.storage_path, r.name, r.storage_endpoint, r.storage_region)
    checkpoint = ray.train.Checkpoint(path=f"{run_dir}/{checkpoint_dir}", filesystem=fs)
    return ray.train.Result(metrics=metrics, checkpoint=checkpoint, error=None,
                            path=display_path(r.storage_path, run_dir), metrics_dataframe=None,
                            best_checkpoints=[(checkpoint, metrics)], _storage_filesystem=fs)
