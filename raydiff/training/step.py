"""One optimizer step: the micro-batches of one gradient-accumulation window, forward and backward
under the configured precision, then clipping, the non-finite check, the optimizer and the LR schedule.

    stepper = Stepper(cfg, model, optimizer, scheduler, device, rank=r, world=w)
    result = stepper.step(micro_batches, global_step)    # StepResult(loss, grad_norm, skipped, tallies)

The noise and timesteps of every micro-batch come from a generator seeded with (seed, step,
micro-batch, rank), so a resumed run needs no RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from raydiff.config import RaydiffConfig
from raydiff.pipelines.base import autocast_dtype
from raydiff.training import fsdp
from raydiff.training.optimizers import config_hyperparameters, make_optimizer


def step_seed(seed: int, step: int, micro: int, rank: int, world: int) -> int:
    """A distinct, reproducible seed for each (step, micro-batch, rank): resume needs no RNG state."""
    return (seed * 1_000_003 + (step * 4096 + micro) * world + rank) % (2**63)


def build_optimizer(cfg: RaydiffConfig, params: list[torch.nn.Parameter], total_steps: int):
    """`train.optimizer` over `params` (raydiff.training.optimizers) and the configured LR schedule
    (warmup, then constant, cosine or linear)."""
    from diffusers.optimization import get_scheduler  # here: the data feed imports this module early

    t = cfg.train
    optimizer = make_optimizer(t, params)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[t.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def apply_hyperparameters(cfg: RaydiffConfig, optimizer, scheduler) -> None:
    """After loading a checkpoint: the config's learning rate and the optimizer's other settings it owns
    (Adam betas and eps, weight decay) win over the checkpoint's, from the resumed step on; the moments
    and the schedule's position are kept. (`optimizer.load_state_dict` restores the saved settings, so
    without this a changed learning rate would be ignored.) The schedule is diffusers' LambdaLR: lr = base
    lr x its factor at the step."""
    t = cfg.train
    settings = {k: v for k, v in config_hyperparameters(t).items() if k != "lr"}
    for group in optimizer.param_groups:
        group.update(settings, initial_lr=t.learning_rate)
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = t.learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


@dataclass(frozen=True)
class StepResult:
    loss: float  # this rank's mean micro-batch loss, as optimized
    grad_norm: float  # of the all-reduced gradients, so every rank sees the same value
    skipped: bool  # non-finite loss or gradients: the optimizer did not step
    # {"loss": (sum, count) over training samples' losses, "reg_loss": (sum, count) over regularization ones}
    tallies: dict = field(default_factory=dict)


class Stepper:
    """Owns what happens between two optimizer steps. `model` is what the forward runs through (the
    DDP-wrapped module, or the module itself); its trainable parameters are the optimizer's."""

    def __init__(self, cfg: RaydiffConfig, model: torch.nn.Module, optimizer, scheduler, device, *,
                 rank: int = 0, world: int = 1, sharded: Sequence[str] = ()):
        t = cfg.train
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.seed, self.rank, self.world, self.sharded = t.seed, rank, world, list(sharded)
        self.reg_weight = cfg.data.regularization.weight if cfg.data.regularization else 1.0
        self.accum, self.max_grad_norm = t.gradient_accumulation_steps, t.max_grad_norm or math.inf
        self.dtype, self.offload_activations = autocast_dtype(t.mixed_precision), t.gradient_checkpointing == "offload"
        # FSDP: each rank sees only its shards' gradients; the sharded scaler agrees on overflow across ranks.
        scaler = ShardedGradScaler if sharded else torch.amp.GradScaler
        self.scaler = scaler(device.type, enabled=t.mixed_precision == "fp16")  # fp16 needs loss scaling

    def autocast(self):
        """Mixed precision for the forward (LoRA params and Adam state stay fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def offload(self):
        """Tensors autograd saves (the checkpoint boundaries, with checkpointing on) go to host memory."""
        if not self.offload_activations:
            return nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def no_sync(self, last: bool):
        """DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-batch of a window."""
        if last or self.world == 1:
            return nullcontext()
        return fsdp.no_gradient_sync(self.model, self.sharded) if self.sharded else self.model.no_sync()

    def generator(self, step: int, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.seed, step, micro, self.rank, self.world))

    def step(self, micro_batches: list[dict], step: int) -> StepResult:
        """Forward and backward each micro-batch, then one optimizer step unless the gradients are not
        finite (then they are dropped and, under fp16, the loss scale lowered). `step` is the number of
        optimizer steps taken before this one."""
        losses, tallies = [], {"loss": [0.0, 0], "reg_loss": [0.0, 0]}
        for micro, inputs in enumerate(micro_batches):
            reg = inputs.get("_regularization")  # (B,) bool when the batch holds regularization samples
            with self.no_sync(last=micro == len(micro_batches) - 1):
                with self.autocast(), self.offload():
                    if reg is None:  # any training module's forward(data, generator): the batch's mean loss
                        loss = self.model(inputs, generator=self.generator(step, micro))
                        per_sample = loss.detach().expand(len(inputs["prompt"]))
                    else:
                        per_sample = self.model(inputs, generator=self.generator(step, micro), per_sample=True)
                        loss = (per_sample * self.sample_weights(reg)).mean()
                self.scaler.scale(loss / self.accum).backward()
            losses.append(loss.item())
            _tally(tallies, per_sample.detach().cpu(), reg)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        skipped = not torch.isfinite(grad_norm)
        if not skipped:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(sum(losses) / len(losses), float(grad_norm), skipped,
                          {k: tuple(v) for k, v in tallies.items()})

    def sample_weights(self, regularization: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights: `data.regularization.weight` for its samples, 1 for the others."""
        reg = regularization.to(self.device)
        return torch.where(reg, self.reg_weight, 1.0).float()


def _tally(tallies: dict, per_sample: torch.Tensor, reg: torch.Tensor | None) -> None:
    """Add a micro-batch's per-sample losses to the training and regularization (sum, count) pairs."""
    reg = torch.zeros(len(per_sample), dtype=torch.bool) if reg is None else reg.cpu()
    for key, chosen in (("loss", per_sample[~reg]), ("reg_loss", per_sample[reg])):
        tallies[key][0] += float(chosen.sum())
        tallies[key][1] += len(chosen)
