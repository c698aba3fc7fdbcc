"""The per-worker training loop that Ray Train runs on every rank (DiffSynth's `launch_training_task`
loop, on Ray). Its helpers sit above it; the loop itself is the algorithm box of its docstring."""

from __future__ import annotations

import os
import socket

import ray.train
import ray.train.torch
import torch

from raydiff.config import RaydiffConfig
from raydiff.console import quiet_libraries, quiet_ray_train_reports, say
from raydiff.data.components import training_components
from raydiff.training import fsdp
from raydiff.training.checkpoint import TrainerState, load_checkpoint
from raydiff.training.checkpoint_store import has_checkpoint, newest_complete_checkpoint, run_storage
from raydiff.training.ema import EMA
from raydiff.training.evaluation import EvalSet
from raydiff.training.feed import EpochFeed
from raydiff.training.hooks import StepHooks, gather
from raydiff.training.loop_args import LoopArgs
from raydiff.training.module import DiffusionTrainingModule, PipelineTrainingModule
from raydiff.training.step import Stepper, apply_hyperparameters, build_optimizer


def build_module(cfg: RaydiffConfig, args: LoopArgs, device) -> tuple[DiffusionTrainingModule, list[str]]:
    """The training module, built in this worker (never pickled from the driver), and the names of the
    models FSDP shards (none under DDP). With data.preprocess stream/cache the batches arrive encoded,
    so only the DiT (and what trains) is loaded."""
    torch.manual_seed(cfg.train.seed)  # the LoRA init follows train.seed (DDP then copies rank 0's to every rank)
    module = args.build_module(device)
    if module is None:
        module = PipelineTrainingModule(cfg, device, training_components(cfg))
    sharded = list(cfg.train.trainable_models) if cfg.ray.strategy == "fsdp" else []
    if sharded:  # before the optimizer: sharding swaps each parameter for this rank's shard
        fsdp.shard_module(module, sharded, cfg.train.mixed_precision)
    assert module.trainable_parameters(), "the training module has no trainable parameters"
    return module, sharded


def distribute(module: DiffusionTrainingModule, sharded: list[str], unused: bool = False) -> torch.nn.Module:
    """What the forward runs through: DDP around the module, or the module itself (FSDP shards it in place).
    `unused`: some trainable parameters get no gradient (a ControlNet's last block computes a text stream that
    nothing reads), which DDP must be told."""
    if sharded:
        return module
    # Frozen weights load identically on every rank: DDP need not broadcast them from rank 0 at start
    # (gigabytes for a 12B base), and cannot broadcast quantized ones (torchao's tensors have no `view`).
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": unused})


def newest_checkpoint(rank: int, world: int, local_storage=None) -> ray.train.Checkpoint | None:
    """The newest complete checkpoint on storage (rank 0 looks, every rank gets its answer), else Ray's
    own latest (a run written before completeness markers), else None."""
    fs, run_dir = run_storage(local_storage)
    found = [newest_complete_checkpoint(fs, run_dir) if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    if found[0] is None:
        return ray.train.get_checkpoint()
    return ray.train.Checkpoint(path=found[0][1], filesystem=fs)


def resume(cfg, module, optimizer, scheduler, sharded: list[str], rank: int, world: int,
           ema: EMA | None = None, local_storage=None) -> TrainerState:
    """The newest complete checkpoint of this run (weights, optimizer, schedule, EMA, position), or a fresh
    state. The config's optimizer settings apply from the resumed step on."""
    checkpoint = newest_checkpoint(rank, world, local_storage)
    if checkpoint is None:
        return TrainerState()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, module, optimizer, scheduler, sharded, ema)
    apply_hyperparameters(cfg, optimizer, scheduler)
    if rank == 0:
        say(f"[raydiff] resumed at step {state.global_step} (epoch {state.epoch}, batch {state.batches_in_epoch}) "
            f"from {os.path.basename(checkpoint.path)}")
    return state


def worker_placement(rank: int, world: int, module: DiffusionTrainingModule) -> list[dict]:
    """Where each rank runs, which models it loaded, its torch threads and its resident memory then,
    gathered from all ranks; recorded in trainer_state.json."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "models": sorted(getattr(module, "models", {}).keys()), "torch_threads": torch.get_num_threads(),
          "rss_gib": round(rss / 2**30, 3)}
    return gather(me, world)


def train_loop_per_worker(loop_config: dict, feed: EpochFeed | None = None) -> None:
    """Train on this rank.

        setup    this rank's data feed, the training module (DDP or FSDP), the optimizer, the LR schedule
                 and the EMA of the trainable weights (train.ema)
        resume   weights, optimizer, schedule, EMA and data position from the newest checkpoint
        for epoch, for step:
                 forward + backward over the step's micro-batches -> clip -> optimizer step
                 EMA update / log line / eval loss / checkpoint, each when its interval comes round
        finish   a final checkpoint unless the last step wrote one

    `feed`: this rank's data, already started (raydiff.launch.trainer starts it before this module is
    imported, so the data pipeline starts while the model stack loads); built here otherwise.
    """
    quiet_libraries()
    quiet_ray_train_reports()
    args: LoopArgs = loop_config["args"]
    cfg = args.parse_config()
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    # [1] setup
    feed = feed or EpochFeed(cfg, args, device, fresh=not has_checkpoint(args.storage))
    module, sharded = build_module(cfg, args, device)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), args.total_steps)
    ema = EMA(module.trainable_parameters(), cfg.train.ema) if cfg.train.ema else None

    # [2] resume
    state = resume(cfg, module, optimizer, scheduler, sharded, rank, world, ema, args.storage)
    feed.restore(state.positions)
    state.workers = worker_placement(rank, world, module)
    forward = distribute(module, sharded, unused=cfg.model.controlnet is not None)
    stepper = Stepper(cfg, forward, optimizer, scheduler, device, rank=rank, world=world, sharded=sharded)
    eval_set = None if args.eval_set is None else EvalSet.for_rank(args.eval_set, cfg, device, rank, world,
                                                                   whole=bool(sharded))
    hooks = StepHooks(cfg, args, module, optimizer, scheduler, feed, eval_set, rank=rank, world=world,
                      device=device, sharded=sharded, start_step=state.global_step, ema=ema)

    # [3] train
    try:
        for epoch in range(state.epoch, cfg.train.num_epochs):
            if state.global_step >= args.total_steps:
                break
            for micro_batches in feed.epoch(epoch, skip=state.batches_in_epoch):
                result = stepper.step(micro_batches, state.global_step)
                state.advance(result, len(micro_batches), feed.micro_per_epoch)
                hooks.after_step(state, result)
                if state.global_step >= args.total_steps:
                    break
            else:
                state.end_epoch(epoch)  # the split ran out, even if bad samples left it short of the plan
    finally:
        feed.close()  # also when stopped (local mode's Ctrl-C: raydiff.launch.trainer.fit_interruptibly)

    # [4] finish
    hooks.finish(state)
