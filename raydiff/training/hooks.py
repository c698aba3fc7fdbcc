"""What happens after an optimizer step, on the schedule the config sets: the EMA update, the log line,
the eval loss and checkpoints (with validation samples and, at the end, the loss plot), reported to Ray
Train.

Every rank calls `after_step` and `finish` at the same steps: the eval loss is a collective and
`ray.train.report` is a barrier. Rank 0 prints, writes the checkpoint directory and attaches it to
its report; the other ranks report the same metrics without one.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext

import ray.train
import torch

from raydiff.config import CONTROLNET, RaydiffConfig, dump_config, to_dict
from raydiff.data.decode import skipped_samples
from raydiff.pipelines.controlnet import CONTROL_IMAGE
from raydiff.training import fsdp, model_card
from raydiff.training.checkpoint import FULL_WEIGHTS_FILE, MODEL_WEIGHTS_FILE, TrainerState, save_checkpoint
from raydiff.training.checkpoint_store import checkpoint_name, store_checkpoint, upload_and_mark_complete
from raydiff.training.ema import EMA
from raydiff.training.evaluation import EvalSet
from raydiff.training.loop_args import LoopArgs
from raydiff.training.lora_formats import LORA_FILE
from raydiff.training.reporting import RunLogger, peak_memory_gib, plot_losses
from raydiff.training.step import StepResult
from raydiff.training.validation import ValidationSettings, condition_images, sample_base_images, write_validation


class LogWindow:
    """Loss, data wait and throughput since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tallies, self.steps, self.start = {}, 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        for key, (total, count) in result.tallies.items():
            old = self.tallies.get(key, (0.0, 0))
            self.tallies[key] = (old[0] + total, old[1] + count)
        self.steps += 1

    def means(self, world: int, device) -> dict[str, float]:
        """{"loss": mean training-sample loss, "reg_loss": mean regularization-sample loss} over every
        rank's samples since the last reset (a key without samples is left out)."""
        keys = sorted(self.tallies)
        sums = sum_across_ranks([v for k in keys for v in self.tallies[k]], world, device)
        return {k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(keys) if sums[2 * i + 1]}


class StepHooks:
    """Logs, evaluates and checkpoints after each optimizer step (see the module docstring)."""

    def __init__(self, cfg: RaydiffConfig, args: LoopArgs, module, optimizer, scheduler, feed, eval_set: EvalSet | None,
                 *, rank: int, world: int, device, sharded=(), start_step: int = 0, ema: EMA | None = None):
        self.cfg, self.args, self.module, self.optimizer, self.scheduler = cfg, args, module, optimizer, scheduler
        self.ema = ema
        self.feed, self.eval_set, self.rank, self.world, self.device = feed, eval_set, rank, world, device
        self.sharded, self.config_yaml = list(sharded), dump_config(cfg)
        self.eval_every = cfg.eval.every_steps or args.total_steps
        self.logger = None
        if rank == 0:
            self.logger = RunLogger(cfg.logging, args.run_dir, args.total_steps, start_step, args.is_tty, args.relay)
        self.window, self.last_saved, self.bad_in_a_row = LogWindow(), start_step, 0
        v = cfg.validation
        self.validation = ValidationSettings(prompts=v.prompts, seed=v.seed, steps=v.steps, guidance=v.guidance,
                                             height=v.height, width=v.width, num_frames=v.num_frames,
                                             images=condition_images(v.images) if rank == 0 else (),
                                             condition_key=CONTROL_IMAGE if cfg.model.controlnet else None)
        self.base_images = None  # the base model never changes: sampled once, at the first checkpoint

    def after_step(self, state: TrainerState, result: StepResult) -> None:
        if result.skipped:
            self._skipped(state)
            return
        self.bad_in_a_row = 0
        self.window.add(result)
        step, t = state.global_step, self.cfg.train
        if self.ema is not None:
            self.ema.update(step)
        done = step >= self.args.total_steps
        save = done or step % t.save_steps == 0
        evaluate = self.eval_set is not None and (done or step % self.eval_every == 0)
        if step % t.log_steps == 0 or save or evaluate:
            metrics = self._metrics(state, result, evaluate)
            state.log_history.append(metrics)
            if self.logger:
                self.logger.log(metrics)
            # Ray consumes one report per health check (~2 s): metrics reach Ray only with checkpoints and
            # eval losses (what Tune schedules on).
            if save or evaluate:
                self._report(metrics, state, save=save, final=done)

    def finish(self, state: TrainerState) -> None:
        """A final checkpoint unless the last step wrote one; then the closing line."""
        if state.global_step != self.last_saved:
            metrics = {"step": state.global_step, "epoch": state.epoch,
                       "skipped_samples": skipped_samples(self.args.skip_counter)}
            if self.eval_set is not None:
                metrics["eval_loss"] = self.eval_set.loss(self.module)
            self._report(metrics, state, save=True, final=True)
        if self.sharded and self.world > 1:
            torch.distributed.barrier()  # no rank tears the process group down while another still gathers
        if self.logger:
            self.logger.write(f"[raydiff] finished: {state.global_step}/{self.args.total_steps} steps")
            self.logger.close()

    def _skipped(self, state: TrainerState) -> None:
        # Gradients are all-reduced before the check, so every rank skips (and stops) together.
        state.bad_steps += 1
        self.bad_in_a_row += 1
        step = state.global_step + 1
        if self.logger:
            self.logger.write(f"[raydiff] step {step}: non-finite loss or gradients; step skipped "
                              f"({self.bad_in_a_row} in a row, {state.bad_steps} in total)")
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            last = checkpoint_name(self.last_saved) if self.last_saved else "none"
            raise FloatingPointError(
                f"{self.bad_in_a_row} consecutive steps with non-finite loss or gradients at step {step}; last "
                f"good checkpoint: {last} in {self.cfg.ray.storage_path}/{self.cfg.ray.name}")

    def _metrics(self, state: TrainerState, result: StepResult, evaluate: bool) -> dict:
        w, t = self.window, self.cfg.train
        elapsed = time.perf_counter() - w.start
        samples_per_step = t.batch_size * t.gradient_accumulation_steps * self.world
        metrics = {"step": state.global_step, "epoch": state.global_step / self.args.steps_per_epoch,
                   **w.means(self.world, self.device),
                   "lr": self.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
                   "samples_per_second": w.steps * samples_per_step / elapsed,
                   "data_wait_s": self.feed.take_wait_s(), "peak_memory_gib": peak_memory_gib(self.device),
                   "time": time.time()}
        w.reset()
        state.skipped_samples = metrics["skipped_samples"] = skipped_samples(self.args.skip_counter)
        if evaluate:
            metrics["eval_loss"] = self.eval_set.loss(self.module)
        return metrics

    def _report(self, metrics: dict, state: TrainerState, *, save: bool, final: bool) -> None:
        """Every rank reports; with `save`, rank 0 also writes the checkpoint and attaches it. Under FSDP
        every rank first gathers the full weights and optimizer state (collectives)."""
        if not save:
            ray.train.report(metrics)
            return
        if self.feed.position is not None:  # sharded data: where each rank's stream goes on
            state.positions = gather(list(self.feed.position), self.world)
        weights = optimizer_state = None
        if self.sharded:
            weights = fsdp.full_state_dict(self.module, self.sharded)
            optimizer_state = fsdp.optimizer_state(self.module, self.optimizer)
        ema_weights = self._ema_weights()
        with tempfile.TemporaryDirectory(prefix="raydiff-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(tmp, self.module, self.optimizer, self.scheduler, state, self.config_yaml, weights,
                                optimizer_state, ema_weights)
                self._write_samples(tmp, state, final)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            upload = upload_and_mark_complete
            if self.args.storage is not None:  # local mode: Ray Train stores nothing, raydiff does its part
                stored = store_checkpoint(tmp, self.args.storage, state.global_step, self.cfg.ray.num_to_keep)
                checkpoint, upload = ray.train.Checkpoint(stored, filesystem=self.args.storage[0]), None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state.global_step),
                             checkpoint_upload_fn=upload)
        self.last_saved = state.global_step

    def _ema_weights(self) -> dict | None:
        """The EMA in the weights' format, on rank 0 (under FSDP gathered from every rank's shards)."""
        if self.ema is None or not (self.sharded or self.rank == 0):
            return None
        if self.sharded:
            return self.ema.weights(lambda: fsdp.full_state_dict(self.module, self.sharded))
        return self.ema.weights(self.module.trainable_state_dict)

    def _write_samples(self, directory: str, state: TrainerState, final: bool) -> None:
        """Validation samples (at the steps `validation.every_steps` picks) and, at the end, loss.png and the
        model card (README.md)."""
        v = self.cfg.validation
        if v.prompts and (final or v.every_steps is None or state.global_step % v.every_steps == 0):
            if self.base_images is None:
                self.base_images = sample_base_images(self.module.pipe, self.validation)
            with self.ema.applied() if v.use_ema else nullcontext():
                written = write_validation(directory, self.module.pipe, None, self.validation,
                                           base_images=self.base_images)
            self.logger.image("validation/grid", written["grid"], state.global_step)
        if final and self.cfg.logging.plot:
            plot_losses(state.log_history, os.path.join(directory, "loss.png"))
        if final:
            facts = model_card.facts_from_config(to_dict(self.cfg), steps=state.global_step, dataset=self.args.dataset,
                                                 directory=directory)
            weights = LORA_FILE if self.cfg.lora is not None else FULL_WEIGHTS_FILE
            if self.cfg.model.controlnet is not None and self.cfg.lora is None:
                weights = f"{CONTROLNET}/{MODEL_WEIGHTS_FILE}"
            model_card.write_card(directory, facts, weights=weights)


def gather(value, world: int) -> list:
    """`value` from every rank, in rank order (a collective when world > 1)."""
    if world == 1:
        return [value]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, value)
    return everyone


def sum_across_ranks(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
