"""`raydiff tune`: a Ray Tune search over config keys, one Ray Train run per trial (Train V2 + Tune).

Each trial is a small driver function (`tune.with_resources`, `tune.trial_cpus` CPUs) that applies its
sampled values to the config, names its run `<ray.name>-<trial id>` and fits a `TorchTrainer` whose
`TuneReportCallback` forwards every `ray.train.report` to Tune. The loop reports at eval steps and
checkpoints, so ASHA's `training_iteration` counts those reports. When ASHA stops a trial Tune kills
its driver; freeing the trial's worker placement group then needs Ray's dashboard (`ray[default]`).

The trials' runs and checkpoints live in `<storage>/<name>-<trial id>/checkpoint-*`; Tune's own
state, `trials.csv` and `best/` (a copy of the best trial's final checkpoint) in `<storage>/<name>/`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.sample import Domain, Integer

from raydiff.config import ConfigError, RaydiffConfig, apply_overrides, config_key_error, parse_config, to_dict
from raydiff.config import TuneConfig as TuneSettings
from raydiff.console import say
from raydiff.data.decode import skip_counter_name
from raydiff.data.metadata import family_max_paths, train_and_eval_rows
from raydiff.data.shards import plan_shards
from raydiff.launch.cluster import init_ray
from raydiff.launch.storage import display_path, run_directory, storage_filesystem
from raydiff.launch.trainer import HEALTH_CHECK_INTERVAL, build_trainer, steps_per_epoch, total_steps


def _domain(key: str, name: str, args: list, grid: bool):
    """One YAML distribution (`{loguniform: [1e-5, 1e-3]}`) as a Tune domain. YAML 1.1 reads `1e-5`
    (no dot) as a string, hence the float() casts."""
    try:
        if name in ("choice", "grid_search"):
            return ray.tune.grid_search(list(args)) if grid or name == "grid_search" else ray.tune.choice(list(args))
        if name == "randint":
            low, high = (int(a) for a in args)
            if low >= high:
                raise ValueError(f"randint needs low < high (high is exclusive), got {args}")
            return ray.tune.randint(low, high)
        low, high, *q = (float(a) for a in args)
        if low >= high:
            raise ValueError(f"{name} needs low < high, got {args}")
        return {"loguniform": ray.tune.loguniform, "uniform": ray.tune.uniform,
                "quniform": ray.tune.quniform}[name](low, high, *q)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tune.param_space.{key}: {err}") from None


def _candidates(domain) -> list:
    """Values worth validating before any trial starts: every listed value, or the range's ends."""
    if isinstance(domain, dict):  # grid_search
        return list(domain["grid_search"])
    if hasattr(domain, "categories"):
        return list(domain.categories)
    lower, upper = domain.lower, domain.upper
    return [lower, upper - 1] if isinstance(domain, Integer) else [lower, upper]


def search_space(config: RaydiffConfig, param_space: dict) -> dict:
    """`{dotted key: YAML distribution or Tune domain}` -> Tune's param_space, checked against the config:
    unknown keys, and listed values or range ends the config refuses, fail here, before Ray Tune starts."""
    settings = config.tune or TuneSettings()
    if not param_space:
        raise ConfigError("tune.param_space is empty: name at least one config key to search")
    space = {}
    for key, dist in param_space.items():
        if (problem := config_key_error(key)) is not None:
            raise ConfigError(f"tune.param_space: {problem}")
        if isinstance(dist, Domain):
            space[key] = dist  # Tune's own form, from the Python API
        else:
            # Validate the YAML form through the config schema (arity, names), then build the domain.
            TuneSettings(param_space={key: dist}, search_alg=settings.search_alg)
            (name, args), = dist.items()
            space[key] = _domain(key, name, args, grid=settings.search_alg == "grid")
        for value in _candidates(space[key]):
            try:
                parse_config(apply_overrides(to_dict(config), [_override(key, value)]))
            except ConfigError as err:
                raise ConfigError(f"tune.param_space.{key}: the value {value!r} is refused:\n{err}") from None
    return space


END_OF_DOCUMENT = "...\n"  # what safe_dump appends after a lone scalar


def _override(key: str, value: Any) -> str:
    """`key=value` for `apply_overrides`; safe_dump writes floats so that YAML reads them back as floats."""
    value = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune's samplers
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return f"{key}={text.removesuffix(END_OF_DOCUMENT).strip()}"


def trial_config(config: RaydiffConfig, sampled: dict, trial_id: str) -> RaydiffConfig:
    """The config one trial trains: the sampled values applied, its own run name, no `tune:` section
    (its checkpoint's config.yaml re-runs with `raydiff train`)."""
    raw = {**to_dict(config), "tune": None}
    overrides = [_override(k, v) for k, v in sampled.items()] + [_override("ray.name", f"{config.ray.name}-{trial_id}")]
    return parse_config(apply_overrides(raw, overrides))


def concurrency(config: RaydiffConfig) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs (and GPUs) hold now with their
    workers and one decode task each. Drivers take almost nothing, so Tune alone would start every trial:
    their workers would then hold every CPU, leave none for the decoders, and no trial would move."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    r, workers = ray.cluster_resources(), config.ray.num_workers
    fit = r.get("CPU", 0) // (workers * config.ray.cpus_per_worker + config.data.num_cpus + config.tune.trial_cpus)
    if config.ray.use_gpu and config.ray.gpus_per_worker:
        fit = min(fit, r.get("GPU", 0) // (workers * config.ray.gpus_per_worker))
    return max(1, int(fit))


def _trial_dirname(trial) -> str:
    return trial.trial_id  # so that a Result's directory names its trial, even one that never reported


def _trial_id(result: ray.tune.Result) -> str:
    return result.path.rstrip("/").rsplit("/", 1)[-1]


def tune(config: RaydiffConfig, param_space: dict | None = None,
         module_factory: Callable | None = None) -> ray.tune.ResultGrid:
    """Search `param_space` (default `config.tune.param_space`; dotted config keys -> YAML
    distributions such as `{loguniform: [1e-5, 1e-3]}`, or Tune domains) with one Ray Train run per
    trial. Prints the trials table, writes `<storage>/<name>/trials.csv`, copies the best trial's final
    checkpoint to `<storage>/<name>/best/` and returns Tune's ResultGrid."""
    if config.ray.local:
        raise ConfigError("raydiff tune runs every trial on Ray Train workers; set ray.num_workers to 1 or more "
                          "(0 trains in the calling process, which trials cannot share)")
    if config.tune is None:  # validate the defaults against this config (eval_loss needs an eval section)
        config = parse_config({**to_dict(config), "tune": {}})
    config = config.resolved_paths()  # Tune runs each driver in its trial directory
    settings = config.tune
    space = search_space(config, settings.param_space if param_space is None else param_space)
    os.environ.setdefault(*HEALTH_CHECK_INTERVAL)
    init_ray(config, dashboard=True)  # a stopped trial's workers are freed through the dashboard

    def train_driver(sampled: dict) -> None:
        cfg = trial_config(config, sampled, ray.tune.get_context().get_trial_id())
        build_trainer(cfg, module_factory, trial=True, callbacks=[TuneReportCallback()]).fit()

    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(max_t=settings.max_t, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    fs, root = storage_filesystem(config.ray.storage_path, config.ray.storage_endpoint, config.ray.storage_region)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(train_driver, {"CPU": settings.trial_cpus}),
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, scheduler=scheduler,
            # Tune ignores TuneConfig.max_concurrent_trials when given a BasicVariantGenerator: set it here.
            search_alg=BasicVariantGenerator(max_concurrent=concurrency(config), random_state=settings.seed),
            num_samples=settings.num_samples, trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(name=config.ray.name, storage_path=root, storage_filesystem=fs,
                                      verbose=None if config.logging.verbose else 0,
                                      callbacks=[] if config.logging.verbose else [TrialLines(list(space))]),
    )
    with quiet_tune_output(config.logging.verbose):
        grid = tuner.fit()
    if config.data.skip_bad_samples:
        _kill_skip_counters(config, grid)
    report_trials(config, trial_rows(grid, config, list(space), settings.metric, settings.mode), settings)
    if grid.errors and len(grid.errors) == len(grid):  # nothing trained: raise the first trial's own error
        error = grid.errors[0]
        cause = getattr(error, "cause", None)  # Ray's RayTaskError wraps it, traceback text and all
        raise cause if isinstance(cause, Exception) else error
    return grid


@contextlib.contextmanager
def quiet_tune_output(verbose: bool):
    """Tune's console output (the new one prints its banner even at verbose 0) unless logging.verbose."""
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


class TrialLines(ray.tune.Callback):
    """One line per trial event instead of Tune's status tables (those come back with logging.verbose)."""

    def __init__(self, keys: list[str]):
        self.keys = keys

    def _name(self, trial) -> str:
        values = ", ".join(f"{k}={_cell(trial.config.get(k))}" for k in self.keys)
        return f"trial {trial.trial_id} ({values})"

    def on_trial_start(self, iteration, trials, trial, **info):
        say(f"[raydiff] {self._name(trial)} started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("eval_loss") is not None:
            say(f"[raydiff] trial {trial.trial_id} step {result.get('step')}: eval_loss {result['eval_loss']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"[raydiff] trial {trial.trial_id} ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"[raydiff] trial {trial.trial_id} failed: {_last_error_line(trial)}")


def _last_error_line(trial) -> str:
    """The last line of the error text Tune wrote to the trial's local error.txt before calling back."""
    path = trial.error_file
    if path and os.path.exists(path):
        with open(path) as f:
            lines = f.read().strip().splitlines()
    else:
        lines = []
    return lines[-1] if lines else f"see {path or 'the trial directory'}"


def trial_rows(grid: ray.tune.ResultGrid, config: RaydiffConfig, keys: list[str], metric: str,
               mode: str = "min") -> list[dict]:
    """One row per trial from Tune's per-report history: the sampled values, the best `metric`, the
    last step, the number of reports, how it ended and its final checkpoint."""
    rows, planned = [], {}
    for result in grid:
        history = result.metrics_dataframe
        reported = history is not None and len(history) > 0
        values = history[metric].dropna() if reported and metric in history else []
        checkpoints = history[CHECKPOINT_PATH_KEY].dropna() if reported and CHECKPOINT_PATH_KEY in history else []
        last_step = int(history["step"].iloc[-1]) if reported and "step" in history else 0
        sampled = {key: result.config.get(key) for key in keys}
        if result.error:
            status = "error"
        else:  # stopped by the scheduler (ASHA, max_t) before its last step, or completed
            cfg = trial_config(config, sampled, _trial_id(result))
            plan = json.dumps([to_dict(cfg)[s] for s in ("data", "eval", "train")] + [cfg.ray.num_workers])
            if plan not in planned:
                planned[plan] = planned_steps(cfg)
            status = "completed" if last_step >= planned[plan] else "stopped"
        rows.append({
            "trial_id": _trial_id(result),
            **sampled,
            f"best_{metric}": float(values.min() if mode == "min" else values.max()) if len(values) else math.nan,
            "last_step": last_step,
            "reports": len(history) if reported else 0,
            "status": status,
            "checkpoint": checkpoints.iloc[-1] if len(checkpoints) else "",
            "error": str(result.error).strip().splitlines()[0] if result.error else "",
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def planned_steps(cfg: RaydiffConfig) -> int:
    """The optimizer steps a run of `cfg` plans (as the trainer computes them; reads the metadata)."""
    if cfg.data.sharded:
        samples = plan_shards(cfg.data, cfg.train.seed).num_samples
    else:
        samples = len(train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))[0])
    return total_steps(cfg, steps_per_epoch(samples, cfg))


def report_trials(config: RaydiffConfig, rows: list[dict], settings: TuneSettings) -> None:
    """Print the table, write trials.csv and copy the best trial's final checkpoint to best/."""
    fs, experiment = run_directory(config.ray.storage_path, config.ray.name, config.ray.storage_endpoint,
                                   config.ray.storage_region)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    fs.create_dir(experiment, recursive=True)
    with fs.open_output_stream(f"{experiment}/trials.csv") as f:
        f.write(text.getvalue().encode())
    say(format_table(rows))
    say(f"[raydiff] trials table: {display_path(config.ray.storage_path, experiment)}/trials.csv")

    key = f"best_{settings.metric}"
    ranked = [r for r in rows if not math.isnan(r[key]) and r["checkpoint"]]
    if not ranked:
        say(f"[raydiff] no trial reported {settings.metric} with a checkpoint; nothing copied to best/")
        return
    best = (min if settings.mode == "min" else max)(ranked, key=lambda r: r[key])
    target = f"{experiment}/best"
    fs.delete_dir_contents(target, missing_dir_ok=True)
    fs.create_dir(target, recursive=True)
    pafs.copy_files(best["checkpoint"], target, source_filesystem=fs, destination_filesystem=fs)
    shown = [display_path(config.ray.storage_path, p) for p in (best["checkpoint"], target)]
    say(f"[raydiff] best trial {best['trial_id']}: {settings.metric} {best[key]:.6g}; final checkpoint "
        f"{shown[0]} copied to {shown[1]}")


def format_table(rows: list[dict]) -> str:
    columns = [c for c in (rows[0] if rows else {}) if c not in ("checkpoint", "error")]
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _kill_skip_counters(config: RaydiffConfig, grid: ray.tune.ResultGrid) -> None:
    """Trials' skip counters are detached actors; a trial stopped by ASHA never kills its own."""
    for result in grid:
        name = f"{config.ray.name}-{_trial_id(result)}"
        try:
            ray.kill(ray.get_actor(skip_counter_name(name)))
        except ValueError:  # already gone
            pass
