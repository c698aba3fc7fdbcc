"""Build and run the Ray Train `TorchTrainer` for a config (DiffSynth's `launch_training_task`)."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from raydiff.config import RaydiffConfig, to_remote
from raydiff.console import say
from raydiff.data.dataset import build_train_data
from raydiff.data.decode import skip_counter, skip_counter_name
from raydiff.data.eval_set import start_eval_set
from raydiff.data.metadata import family_max_paths, train_and_eval_rows
from raydiff.launch.checks import (
    check_batch_sizes,
    check_devices,
    check_lora,
    check_lora_file,
    check_model,
    check_resources,
    check_validation_images,
    warn_job_local_storage,
)
from raydiff.launch.cluster import (
    DriverConsole,
    check_ray_address,
    init_ray,
    is_autoscaling,
    local_ray_resources,
    quiet_ray_driver,
    stop_ray,
)
from raydiff.launch.entry import train_loop_per_worker
from raydiff.launch.interrupts import raise_on_sigterm
from raydiff.launch.process_group import ProcessGroupConfig, torch_trainer
from raydiff.launch.run_lock import LOCK_FILE, RunLock
from raydiff.launch.runs import describe_plan, finished_result, stored_result
from raydiff.launch.storage import (
    check_storage,
    latest_checkpoint,
    local_path,
    resume_point,
    run_directory,
    storage_filesystem,
)
from raydiff.training.loop_args import LoopArgs
from raydiff.training.model_card import dataset_summary

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer


def run_dir(cfg: RaydiffConfig) -> str:
    """Where rank 0 writes TensorBoard events: the run's storage directory when it is local, else a
    local directory of the same name (remote storage holds checkpoints only)."""
    local = local_path(cfg.ray.storage_path)
    if local is None:
        return os.path.join(os.path.expanduser("~"), ".raydiff", "runs", cfg.ray.name)
    return os.path.join(local, cfg.ray.name)


def steps_per_epoch(num_rows: int, cfg: RaydiffConfig) -> int:
    """Optimizer steps each worker takes per epoch; Ray's equal split drops the remainder rows."""
    t, workers = cfg.train, cfg.ray.ranks
    steps = num_rows // workers // t.batch_size // t.gradient_accumulation_steps
    if steps == 0:
        raise ValueError(
            f"{num_rows} samples are too few for {workers} ranks x batch_size {t.batch_size} x "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps}; add data, data.repeat or fewer workers")
    return steps


def total_steps(cfg: RaydiffConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: `train.num_epochs` epochs, or `train.max_steps` if that ends first."""
    epochs = steps_per_epoch * cfg.train.num_epochs
    return epochs if cfg.train.max_steps is None else min(cfg.train.max_steps, epochs)


@dataclass
class RunPlan:
    """What the driver prepared for a run: the datasets and what every worker is told."""

    datasets: dict
    args: LoopArgs


def plan_run(cfg: RaydiffConfig, module_factory: Callable | None = None, rows=None, relay=None) -> RunPlan:
    """Read the metadata (unless `rows` from `train_and_eval_rows` are given), build the datasets of the
    configured preprocess mode and count the steps. Needs a running Ray."""
    rows, eval_rows, bad = rows or train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))
    counter = None
    if cfg.data.skip_bad_samples:
        counter = skip_counter_name(cfg.ray.name)
        actor = skip_counter(cfg.ray.name)
        ray.get([actor.add.remote(b.row, b.reason) for b in bad])
    # inline: workers decode and encode; stream: an encoder actor pool feeds them latents; cache: the
    # parquet cache (built first if missing or stale) does. See raydiff/data/dataset.py.
    d = cfg.data  # stream mode with caption dropout: the eval task encodes the empty prompt too (one encoder load)
    share = bool(eval_rows) and d.preprocess == "stream" and d.caption_dropout > 0 and not d.sharded
    evals = start_eval_set(cfg, eval_rows, counter, empty_prompt=share) if eval_rows else None
    train = build_train_data(cfg, rows, seed=cfg.train.seed, counter_name=counter,
                             empty_prompt=evals.empty_prompt if evals else None)
    datasets = {} if train.dataset is None else {"train": train.dataset}
    epoch_steps = steps_per_epoch(train.num_samples, cfg)
    args = LoopArgs(to_remote(cfg), epoch_steps, total_steps(cfg, epoch_steps), packed=train.packed,
                    empty_prompt=train.empty_prompt, eval_set=evals.samples if evals else None,
                    skip_counter=counter, run_dir=run_dir(cfg), is_tty=sys.stdout.isatty(),
                    module_factory=module_factory, relay=relay, shards=train.shards,
                    dataset=dataset_summary(rows, cfg.data.repeat, train.num_samples),
                    storage=run_directory(cfg.ray.storage_path, cfg.ray.name, cfg.ray.storage_endpoint,
                                          cfg.ray.storage_region) if cfg.ray.local else None)
    return RunPlan(datasets, args)


def build_trainer(cfg: RaydiffConfig, module_factory: Callable | None = None, *, plan: RunPlan | None = None,
                  trial: bool = False, **run_config_kwargs) -> TorchTrainer:
    """A TorchTrainer whose workers build the training module themselves (`module_factory(device)`,
    or the config-driven module) and stream samples from the Ray Data pipeline of `plan` (made here
    when not given). `trial`: a Tune trial's, which keeps Ray Train's placement-group cleaner."""
    plan = plan or plan_run(cfg, module_factory)
    # preserve_order: the split gives rank r the same samples in the same order on every run, whatever
    # the node layout (else Ray splits by decode-task completion order and block locality), so runs
    # reproduce and a resumed epoch skips exactly the batches it trained. Cost: no locality, in-order decode.
    ingest = ExecutionOptions(preserve_order=True)
    filesystem, storage_path = storage_filesystem(cfg.ray.storage_path, cfg.ray.storage_endpoint,
                                                  cfg.ray.storage_region)
    run_config_kwargs.setdefault("storage_filesystem", filesystem)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    datasets = plan.datasets
    if cfg.ray.local:  # Ray Train's local mode hands the loop the datasets themselves, without DataConfig
        datasets = {name: with_options(ds, ingest) for name, ds in datasets.items()}
    return torch_trainer(trial)(
        train_loop_per_worker,
        train_loop_config={"args": plan.args},
        torch_config=ProcessGroupConfig(),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=cfg.ray.name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"), **run_config_kwargs),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
    )


def with_options(dataset: ray.data.Dataset, options: ExecutionOptions) -> ray.data.Dataset:
    """A copy of `dataset` that executes with `options`, as Ray Train's DataConfig makes for its workers."""
    dataset = dataset.copy(dataset)
    dataset.context.execution_options = copy.deepcopy(options)
    return dataset


def launch_training_task(cfg: RaydiffConfig, module_factory: Callable | None = None) -> ray.train.Result:
    """Train `cfg` on Ray (starting a local Ray if none is running) and return Ray's Result.

    Before Ray starts: relative paths are resolved against the working directory, and the model, the metadata,
    the batch sizes, that `lora.init_from` is a safetensors file and that no other run holds a local run
    directory are checked; the adapter setup (`lora.target_modules`, `lora.init_from`) is checked while Ray
    starts; then the storage is checked, the run takes its lock, the cluster's resources are checked, and the
    run resumes from its newest complete checkpoint, if any. Ctrl-C stops it within seconds; the checkpoint a
    re-run continues from is printed at the end either way.
    """
    cfg = cfg.resolved_paths()
    r = cfg.ray
    warn_job_local_storage(cfg)
    check_model(cfg)
    check_devices(cfg)
    check_validation_images(cfg)
    check_lora_file(cfg)
    rows = train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))
    if rows[0] is not None:
        check_batch_sizes(cfg, rows[0])
    if not ray.is_initialized() and not (r.address or os.environ.get("RAY_ADDRESS")):
        check_resources(cfg, autoscaling=False, nodes=lambda: [local_ray_resources(cfg)])  # before Ray starts
    if local_path(r.storage_path) is not None:  # a local lock is read before Ray starts (remote storage: later)
        run_lock(cfg).refuse_if_held()
    if not ray.is_initialized() and (r.address or os.environ.get("RAY_ADDRESS")):
        check_ray_address(cfg)  # before the LoRA check starts beside ray.init
    started = start_ray_checking_lora(cfg)
    check_storage(r.storage_path, r.storage_endpoint, r.storage_region)  # after: it makes the storage folder
    with run_lock(cfg):
        try:
            return _train(cfg, module_factory, rows, started)
        finally:
            resumes = latest_checkpoint(r.storage_path, r.name, r.storage_endpoint, r.storage_region)
            if resumes:
                say(f"[raydiff] a re-run of {r.name} continues from {resumes}")
            if cfg.data.skip_bad_samples and ray.is_initialized():
                with contextlib.suppress(Exception):
                    ray.kill(skip_counter(r.name))


def run_lock(cfg: RaydiffConfig) -> RunLock:
    r = cfg.ray
    fs, run_path = run_directory(r.storage_path, r.name, r.storage_endpoint, r.storage_region)
    return RunLock(fs, f"{run_path}/{LOCK_FILE}", f"{r.storage_path}/{r.name}")


# Ray Train's controller polls its workers every 2 s by default, and each report or finish waits for
# a poll: 0.5 s makes checkpoints, Tune reports and the end of a run ~1.5 s sooner for a negligible
# cost. Ray propagates RAY_TRAIN_* variables from the driver to the controller and workers.
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def start_ray_checking_lora(cfg: RaydiffConfig) -> bool:
    """`init_ray` with `check_lora` beside it in a thread: the check imports diffusers and peft and builds the
    model's skeleton (4 s on 2 cores), which overlaps Ray's start instead of delaying it. A mistake it finds
    stops a Ray this call started and ends the run as before (`raydiff: error:`, exit 2, no run directory).
    Returns init_ray's answer: whether raydiff started this Ray."""
    if not cfg.logging.verbose:
        quiet_ray_driver()  # first: the check's warnings.catch_warnings() must restore these filters, not drop them
    errors: list[BaseException] = []

    def check() -> None:
        try:
            check_lora(cfg)
        except BaseException as err:  # noqa: BLE001 - raised in the calling thread
            errors.append(err)

    thread = threading.Thread(target=check, daemon=True, name="raydiff-check-lora")
    thread.start()
    try:
        os.environ.setdefault(*HEALTH_CHECK_INTERVAL)
        started = init_ray(cfg)
    finally:
        thread.join()
    if errors:
        if started:
            stop_ray()
        raise errors[0]
    return started


def _train(cfg: RaydiffConfig, module_factory: Callable | None, rows, started: bool) -> ray.train.Result:
    check_resources(cfg, autoscaling=not started and is_autoscaling())
    # Local mode's loop runs in this process and prints here itself: no relay actor to start and poll.
    console = None if cfg.ray.local else DriverConsole(cfg.logging.progress_bar, sys.stdout.isatty())
    try:
        plan = plan_run(cfg, module_factory, rows, relay=console and console.relay)
        resumed = resume_point(cfg.ray.storage_path, cfg.ray.name, cfg.ray.storage_endpoint, cfg.ray.storage_region)
        say(describe_plan(cfg, plan.args, resumed))
        if resumed is not None and resumed.step >= plan.args.total_steps:
            return finished_result(cfg, resumed)
        result = fit_interruptibly(build_trainer(cfg, module_factory, plan=plan), local=cfg.ray.local)
        if cfg.ray.local and result.checkpoint is not None:
            result = stored_result(cfg, os.path.basename(result.checkpoint.path), result.metrics)
    finally:
        if console is not None:
            console.close()
    if result.checkpoint is not None:
        say(f"[raydiff] final checkpoint: {result.checkpoint.path}")
    return result


def fit_interruptibly(trainer: TorchTrainer, stop: Callable[[], None] = stop_ray, *,
                      local: bool = False) -> ray.train.Result:
    """`trainer.fit()` in a thread, so that Ctrl-C (or SIGTERM, as `Terminated`) reaches this one at once: it
    calls `stop` (Ray's bounded shutdown) and raises KeyboardInterrupt, even while Ray waits for resources.
    `local`: the training loop itself runs in that thread (local mode), and is stopped first, at its next batch
    (up to 10 s): a thread still reading from Ray Data once Ray is shut down makes Ray end the process (exit 1,
    without the closing lines)."""
    outcome: dict = {}
    # Set when fit() returns. Not `thread.is_alive()`: in Python 3.11 a join() that Ctrl-C interrupts can leave
    # the thread marked as stopped while it runs on.
    done = threading.Event()

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=fit, daemon=True, name="raydiff-fit").start()
    previous = raise_on_sigterm()
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt as stopped:
        say("[raydiff] interrupted: stopping the run")
        stopped.announced = True
        if local:
            from raydiff.training.feed import stop_local_feed

            stop_local_feed()
            done.wait(10)
        stop()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
