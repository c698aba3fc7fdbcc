"""The per-worker training loop that Ray Train runs on every rank.

    data     this rank's feed (raydiff.training.feed), started before the model so they load together
    setup    build the training module in this worker, AdamW over its trainable params, LR schedule
    resume   load the latest checkpoint Ray hands back (weights, optimizer, schedule, position)
    loop     for each batch: loss -> backward -> (every accum) clip, step, schedule -> log -> checkpoint
    finish   final checkpoint and report

`ray.train.report` is a barrier: every rank reports at the same steps, rank 0 alone attaches
the checkpoint. Log lines come from rank 0 every `log_steps`; reports only with checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import ray.train
import ray.train.torch
import torch
from diffusers.optimization import get_scheduler
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from raydiff.config import RaydiffConfig, dump_config, parse_config
from raydiff.console import quiet_libraries, say
from raydiff.data.collate import collate
from raydiff.data.encode import training_components
from raydiff.data.plan import CaptionDropout
from raydiff.training import fsdp
from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.feed import EpochFeed, step_seed
from raydiff.training.evaluation import EvalSettings, evaluate
from raydiff.training.reporting import RunLogger, plot_losses
from raydiff.training.validation import ValidationSettings, sample_base_images, write_validation
from raydiff.training.module import DiffusionTrainingModule, PipelineTrainingModule

ModuleFactory = Callable[[torch.device], DiffusionTrainingModule]


def mixed_precision(cfg: RaydiffConfig, device: torch.device):
    """(autocast context factory, activation-offload context factory, grad scaler) for the config.
    fp16 needs loss scaling (a no-op scaler otherwise); LoRA params and Adam state stay fp32."""
    t = cfg.train
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    # FSDP: each rank sees only its shards' gradients; the sharded scaler agrees on overflow across ranks.
    scaler_cls = ShardedGradScaler if cfg.ray.strategy == "fsdp" else torch.amp.GradScaler
    scaler = scaler_cls(device.type, enabled=t.mixed_precision == "fp16")

    def precision(dev):
        return torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext()

    def offload():
        # Tensors autograd saves (the checkpoint boundaries, with checkpointing on) go to pinned host memory.
        pin = device.type == "cuda"
        return torch.autograd.graph.save_on_cpu(pin_memory=pin) if t.gradient_checkpointing == "offload" else nullcontext()

    return precision, offload, scaler


def build_optimizer(cfg: RaydiffConfig, params: list[torch.nn.Parameter], total_steps: int):
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[t.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def no_gradient_sync(model, sharded: list[str]):
    return fsdp.no_gradient_sync(model, sharded) if sharded else model.no_sync()


def mean_across_ranks(value: float, world: int, device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / world


def worker_placement(rank: int, world: int, module: DiffusionTrainingModule) -> list[dict]:
    """Where each rank runs (node id, host) and which models it loaded, gathered from all ranks;
    recorded in trainer_state.json."""
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "models": sorted(getattr(module, "models", {}).keys())}
    if world == 1:
        return [me]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, me)
    return everyone


def quiet_ray_reports() -> None:
    """Ray Train v2 logs each report at INFO ("Reporting training result ...") through a logger named
    by its file's path, which Ray's LoggingConfig does not reach: one noisy line per checkpoint."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def skipped_samples(counter_name: str | None) -> int:
    if not counter_name:
        return 0
    return ray.get(ray.get_actor(counter_name).count.remote())


def train_loop_per_worker(loop_config: dict, feed: EpochFeed | None = None) -> None:
    """Train on this rank. `feed`: the training data, already started (raydiff.launch.trainer starts
    it before importing this module); built here otherwise."""
    quiet_libraries()
    quiet_ray_reports()
    cfg = parse_config(loop_config["config"])
    factory: ModuleFactory | None = loop_config.get("module_factory")
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    counter_name: str | None = loop_config.get("skip_counter")
    packed: bool = loop_config.get("packed", False)  # bucket batches: one dataset row holds a whole batch
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    total_steps = steps_per_epoch * t.num_epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.num_epochs)
    assert steps_per_epoch > 0, "each worker needs at least one optimizer step per epoch"
    accum, config_yaml = t.gradient_accumulation_steps, dump_config(cfg)

    # [0] data: this rank's split; a fresh run is already decoding its first batches
    feed = feed or EpochFeed(cfg, steps_per_epoch, packed, fresh=ray.train.get_checkpoint() is None)
    micro_per_epoch = feed.micro_per_epoch

    # [1] model, optimizer, schedule — built here, in the worker, never pickled from the driver.
    # With data.preprocess stream/cache the batches arrive encoded: load only the DiT (and what trains).
    torch.manual_seed(t.seed)  # the LoRA init follows train.seed (DDP then copies rank 0's to every rank)
    module = factory(device) if factory else PipelineTrainingModule(cfg, device, training_components(cfg))
    sharded = t.trainable_models if cfg.ray.strategy == "fsdp" else []
    if sharded:  # before the optimizer: sharding swaps each parameter for this rank's shard
        fsdp.shard_module(module, sharded, t.mixed_precision)
    params = module.trainable_parameters()
    assert params, "the training module has no trainable parameters"
    optimizer, scheduler = build_optimizer(cfg, params, total_steps)

    # [2] resume from the latest checkpoint of this run name, if any
    state = TrainerState()
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, module, optimizer, scheduler, sharded)
        if rank == 0:
            say(f"[raydiff] resumed at step {state.global_step} (epoch {state.epoch}, "
                f"batch {state.batches_in_epoch})")
    state.workers = worker_placement(rank, world, module)
    model = module if sharded else ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"find_unused_parameters": False})
    # FSDP forwards are collective, so there every rank scores the whole (small) eval set.
    eval_set = (EvalSet(ray.train.get_dataset_shard("eval"), cfg, device, *((0, 1) if sharded else (rank, world)))
                if cfg.eval.enabled else None)
    eval_every = cfg.eval.every_steps or total_steps
    logger = RunLogger(cfg.logging, loop_config["run_dir"], total_steps, state.global_step,
                       loop_config.get("is_tty")) if rank == 0 else None
    extras = CheckpointExtras(cfg, logger)

    # [3] train
    precision, offload, scaler = mixed_precision(cfg, device)
    dropout = (CaptionDropout(cfg.data.caption_dropout, t.seed, loop_config.get("empty_prompt"))
               if cfg.data.caption_dropout > 0 else None)
    window = LogWindow()
    last_saved, bad_in_a_row = state.global_step, 0
    done = state.global_step >= total_steps
    for epoch in range(state.epoch, t.num_epochs):
        if done:
            break
        skip = state.batches_in_epoch  # resume mid-epoch: do not re-train batches already seen
        optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(feed.epoch(epoch)):
            # Skip what a resumed run already trained, and the remainder past the planned steps
            # (consumed, not abandoned: every rank must drain the split before the next epoch).
            if micro < skip or micro >= micro_per_epoch:
                continue
            inputs = collate(batch, device, cfg.data.data_file_keys, caption_dropout=dropout, epoch=epoch)
            sync_now = (micro + 1) % accum == 0
            generator = torch.Generator().manual_seed(step_seed(t.seed, state.global_step, micro % accum, rank, world))
            # DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-batch of a window.
            with nullcontext() if sync_now or world == 1 else no_gradient_sync(model, sharded):
                with precision(device), offload():
                    loss = model(inputs, generator=generator)
                scaler.scale(loss / accum).backward()
            window.add(loss.item() / accum)
            state.batches_in_epoch = micro + 1
            if not sync_now:
                continue
            # Gradients are already all-reduced, so every rank sees the same norm and skips together.
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # fp16: a lower loss scale for the next step
                state.bad_steps += 1
                bad_in_a_row += 1
                if logger:
                    logger.write(f"[raydiff] step {state.global_step + 1}: non-finite loss or gradients; step "
                                 f"skipped ({bad_in_a_row} in a row, {state.bad_steps} in total)")
                if bad_in_a_row >= t.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_a_row} consecutive steps with non-finite loss or gradients at step "
                        f"{state.global_step + 1}; last good checkpoint: "
                        f"{f'checkpoint-{last_saved:06d}' if last_saved else 'none'} in "
                        f"{cfg.ray.storage_path}/{cfg.ray.name}")
                continue
            bad_in_a_row = 0
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            window.steps += 1
            if state.batches_in_epoch == micro_per_epoch:  # the epoch is complete once its last step is
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            done = state.global_step >= total_steps
            save = done or state.global_step % t.save_steps == 0
            evaluate_now = eval_set is not None and (done or state.global_step % eval_every == 0)
            if state.global_step % t.log_steps == 0 or save or evaluate_now:
                metrics = window.metrics(state, state.global_step / steps_per_epoch,
                                         scheduler.get_last_lr()[0], float(grad_norm), t.batch_size * accum * world,
                                         world, device)
                state.skipped_samples = metrics["skipped_samples"] = skipped_samples(counter_name)
                if evaluate_now:
                    metrics["eval_loss"] = eval_set.loss(module)
                state.log_history.append(metrics)
                if logger:
                    logger.log(metrics)
            # Ray consumes one report per health check (~2 s): metrics reach Ray only with checkpoints and
            # eval losses (what Tune schedules on).
            if save or evaluate_now:
                report(metrics, state, module, optimizer, scheduler, config_yaml, rank, save=save,
                       extras=extras, final=done, sharded=sharded)
                last_saved = state.global_step if save else last_saved
            if done:
                break
        if not done:
            state.epoch, state.batches_in_epoch = epoch + 1, 0

    # [4] a final checkpoint unless the last step already wrote one
    if state.global_step != last_saved:
        metrics = {"step": state.global_step, "epoch": state.epoch, "skipped_samples": skipped_samples(counter_name)}
        if eval_set is not None:
            metrics["eval_loss"] = eval_set.loss(module)
        report(metrics, state, module, optimizer, scheduler, config_yaml, rank, save=True, extras=extras, final=True,
               sharded=sharded)
    if sharded and world > 1:
        torch.distributed.barrier()  # no rank tears the process group down while another still gathers
    if logger:
        logger.write(f"[raydiff] finished: {state.global_step}/{total_steps} steps")
        logger.close()


class EvalSet:
    """This rank's share of the eval set (positions p with p % world == rank), decoded (in stream/cache
    mode also encoded) once and kept on the host; `loss` is the deterministic eval loss reduced across
    ranks. Batches hold samples of one size (eval sets of mixed sizes need no buckets)."""

    def __init__(self, shard, cfg: RaydiffConfig, device, rank: int, world: int):
        self.cfg, self.device, self.world = cfg, device, world
        mine = [row for p, row in enumerate(shard.iter_rows()) if p % world == rank]
        size, sized = cfg.eval.batch_size, {}
        for row in mine:
            sized.setdefault(np.shape(row.get(cfg.data.data_file_keys[0], row.get("latents"))), []).append(row)
        self.batches = [rows[i:i + size] for rows in sized.values() for i in range(0, len(rows), size)]
        self.settings = EvalSettings(num_sigmas=cfg.eval.num_sigmas, seed=cfg.eval.seed)

    def loss(self, module) -> float:
        keys = self.cfg.data.data_file_keys

        def batches():
            for rows in self.batches:
                columns = {k: [r[k] for r in rows] for k in rows[0]}
                columns.update({k: np.stack(columns[k]) for k in keys if k in columns})
                yield collate(columns, self.device, keys), [int(r["_row"]) for r in rows]

        return evaluate(module, batches(), self.settings, self.cfg.loss, self.world, self.device)


class LogWindow:
    """Loss and throughput since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss += loss

    def metrics(self, state: TrainerState, epoch: float, lr: float, grad_norm: float, samples_per_step: int,
                world: int, device) -> dict:
        elapsed = time.perf_counter() - self.start
        m = {"step": state.global_step, "epoch": epoch,
             "loss": mean_across_ranks(self.loss / max(self.steps, 1), world, device), "lr": lr,
             "grad_norm": grad_norm, "samples_per_second": self.steps * samples_per_step / elapsed}
        self.reset()
        return m


class CheckpointExtras:
    """What rank 0 adds to a checkpoint besides the state: validation samples and, at the end, loss.png."""

    def __init__(self, cfg: RaydiffConfig, logger):
        v = cfg.validation
        self.cfg, self.logger, self.base_images = cfg, logger, None
        self.settings = ValidationSettings(prompts=v.prompts, seed=v.seed, steps=v.steps, guidance=v.guidance,
                                           height=v.height, width=v.width, num_frames=v.num_frames)

    def write(self, directory: str, module, state: TrainerState, final: bool) -> None:
        v = self.cfg.validation
        if v.prompts and (final or v.every_steps is None or state.global_step % v.every_steps == 0):
            if self.base_images is None:  # the base model never changes: sample it once
                self.base_images = sample_base_images(module.pipe, self.settings)
            written = write_validation(directory, module.pipe, None, self.settings, base_images=self.base_images)
            self.logger.image("validation/grid", written["grid"], state.global_step)
        if final and self.cfg.logging.plot:
            plot_losses(state.log_history, os.path.join(directory, "loss.png"))


def report(metrics: dict, state: TrainerState, module, optimizer, scheduler, config_yaml: str, rank: int,
           save: bool, extras: CheckpointExtras, final: bool = False, sharded=()) -> None:
    """Every rank reports; with `save`, rank 0 also writes the checkpoint and attaches it.
    `sharded`: FSDP-sharded models, whose full weights and optimizer state every rank gathers first."""
    if not save:
        ray.train.report(metrics)
        return
    weights = optimizer_state = None
    if sharded:
        weights, optimizer_state = fsdp.full_state_dict(module, sharded), fsdp.optimizer_state(module, optimizer)
    with tempfile.TemporaryDirectory(prefix="raydiff-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(tmp, module, optimizer, scheduler, state, config_yaml, weights, optimizer_state)
            extras.write(tmp, module, state, final)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state.global_step:06d}")
