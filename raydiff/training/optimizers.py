"""The optimizers `train.optimizer` names, each from a maintained library:

  adamw      torch.optim.AdamW
  adamw8bit  bitsandbytes' AdamW8bit: both moments stored in 8 bits, blockwise quantized (tensors under
             4096 values keep fp32 moments); a quarter of AdamW's state memory
  adafactor  transformers' Adafactor: a factored second moment (one row and one column vector per
             matrix), no first moment; at the config's learning rate (its relative-step mode off)
  prodigy    prodigyopt's Prodigy: estimates the step size itself; train.learning_rate (~1.0) scales it

Every `state_dict()` holds tensors and numbers only, so checkpoints load with `weights_only=True`.
Under FSDP only AdamW runs (the config refuses the others): its state is elementwise, so it shards
with the parameters; the others keep per-tensor state (8-bit block scales, row/column factors, a
global step-size estimate) that a shard alone does not give.
"""

from __future__ import annotations

import torch

from raydiff.config import TrainConfig


def config_hyperparameters(t: TrainConfig) -> dict:
    """The param-group settings the config owns for `t.optimizer` (a resumed run re-applies them)."""
    if t.optimizer == "adafactor":  # its eps pair and decay rate are its own; no betas
        return {"lr": t.learning_rate, "weight_decay": t.weight_decay}
    return {"lr": t.learning_rate, "betas": tuple(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}


def make_optimizer(t: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`t.optimizer` over `params` with the config's settings."""
    settings = config_hyperparameters(t)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **settings)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **settings)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, scale_parameter=False, relative_step=False, warmup_init=False, **settings)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # During a warmup the small early learning rates would also shrink Prodigy's estimate: its authors'
        # safeguard for schedulers with warmup.
        return Prodigy(params, safeguard_warmup=t.lr_warmup_steps > 0, **settings)
    raise ValueError(f"unknown train.optimizer {t.optimizer!r}")
