"""Build and run the Ray Train `TorchTrainer` for a config (DiffSynth's `launch_training_task`)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydiff.config import RaydiffConfig, to_remote
from raydiff.console import say
from raydiff.data.dataset import build_eval_dataset, build_train_data
from raydiff.data.decode import skip_counter, skip_counter_name
from raydiff.data.metadata import train_and_eval_rows
from raydiff.launch.storage import check_storage, storage_filesystem
from raydiff.training.loop_args import LoopArgs


def train_loop_per_worker(loop_config: dict) -> None:
    """raydiff.training.loop.train_loop_per_worker, imported in the worker (the driver never imports
    diffusers, transformers or peft) once the worker's data feed has started, so the pipeline's
    start-up overlaps those imports and the model load."""
    import ray.train.torch

    from raydiff.training.feed import EpochFeed

    args: LoopArgs = loop_config["args"]
    feed = EpochFeed(args.parse_config(), args, ray.train.torch.get_device(),
                     fresh=ray.train.get_checkpoint() is None)
    from raydiff.training.loop import train_loop_per_worker as loop

    loop(loop_config, feed)


def init_ray(cfg: RaydiffConfig) -> None:
    """Join `ray.address` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    A local Ray gets at least 4 logical CPUs: on a 2-core box, 2 training workers at 1 CPU each
    would otherwise leave nothing for the Ray Data decode stage and the run would hang.
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A new local Ray puts its own address in every worker's RAY_ADDRESS: Ray Train's placement-group
    # cleaner (which frees the workers of a trial ASHA stopped) otherwise looks for "the" local Ray and,
    # with a second Ray on the machine, fails, leaving that trial's CPUs taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the GCS
    try:
        ray.init(num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def run_dir(cfg: RaydiffConfig) -> str:
    """Where rank 0 writes TensorBoard events: the run's storage directory when it is local, else a
    local directory of the same name (remote storage holds checkpoints only)."""
    if "://" in cfg.ray.storage_path:
        return os.path.join(os.path.expanduser("~"), ".raydiff", "runs", cfg.ray.name)
    return os.path.join(cfg.ray.storage_path, cfg.ray.name)


def steps_per_epoch(num_rows: int, cfg: RaydiffConfig) -> int:
    """Optimizer steps each worker takes per epoch; Ray's equal split drops the remainder rows."""
    t, workers = cfg.train, cfg.ray.num_workers
    steps = num_rows // workers // t.batch_size // t.gradient_accumulation_steps
    if steps == 0:
        raise ValueError(
            f"{num_rows} samples are too few for {workers} workers x batch_size {t.batch_size} x "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps}; add data, data.repeat or fewer workers")
    return steps


def total_steps(cfg: RaydiffConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: `train.num_epochs` epochs, or `train.max_steps` if that ends first."""
    epochs = steps_per_epoch * cfg.train.num_epochs
    return epochs if cfg.train.max_steps is None else min(cfg.train.max_steps, epochs)


def build_trainer(cfg: RaydiffConfig, module_factory: Callable | None = None, **run_config_kwargs) -> TorchTrainer:
    """A TorchTrainer whose workers build the training module themselves (`module_factory(device)`,
    or the config-driven module) and stream decoded samples from a Ray Data pipeline."""
    rows, eval_rows, bad = train_and_eval_rows(cfg.data, cfg.eval)
    counter = None
    if cfg.data.skip_bad_samples:
        counter = skip_counter_name(cfg.ray.name)
        actor = skip_counter(cfg.ray.name)
        ray.get([actor.add.remote(b.row, b.reason) for b in bad])
    # inline: workers decode and encode; stream: an encoder actor pool feeds them latents; cache: the
    # parquet cache (built first if missing or stale) does. See raydiff/data/dataset.py.
    train = build_train_data(cfg, rows, seed=cfg.train.seed, counter_name=counter)
    datasets = {"train": train.dataset}
    if eval_rows:  # unsplit: every rank sees the same ordered eval set and scores its share of it
        datasets["eval"] = build_eval_dataset(cfg, eval_rows, counter_name=counter)
    # preserve_order: the split gives rank r the same samples in the same order on every run, whatever
    # the node layout (else Ray splits by decode-task completion order and block locality), so runs
    # reproduce and a resumed epoch skips exactly the batches it trained. Cost: no locality, in-order decode.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    filesystem, storage_path = storage_filesystem(cfg.ray.storage_path, cfg.ray.storage_endpoint,
                                                  cfg.ray.storage_region)
    run_config_kwargs.setdefault("storage_filesystem", filesystem)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    epoch_steps = steps_per_epoch(train.num_samples, cfg)
    args = LoopArgs(to_remote(cfg), epoch_steps, total_steps(cfg, epoch_steps), packed=train.packed,
                    empty_prompt=train.empty_prompt, skip_counter=counter, run_dir=run_dir(cfg),
                    is_tty=sys.stdout.isatty(), module_factory=module_factory)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=cfg.ray.name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"), **run_config_kwargs),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


def launch_training_task(cfg: RaydiffConfig, module_factory: Callable | None = None) -> ray.train.Result:
    """Train `cfg` on Ray (starting a local Ray if none is running) and return Ray's Result.
    Re-running with the same `ray.name` and `ray.storage_path` resumes from the latest checkpoint."""
    check_storage(cfg.ray.storage_path, cfg.ray.storage_endpoint, cfg.ray.storage_region)
    init_ray(cfg)
    try:
        result = build_trainer(cfg, module_factory).fit()
    finally:
        if cfg.data.skip_bad_samples:
            ray.kill(skip_counter(cfg.ray.name))
    if result.checkpoint is not None:
        say(f"[raydiff] final checkpoint: {result.checkpoint.path}")
    return result
