"""`train.ema`: an exponential moving average of the trainable weights (the LoRA, or the full trainable
models), as DiT's `update_ema`:

    after optimizer step s:   s <= start_step                 ema = weights
                              (s - start_step) % every == 0   ema = decay * ema + (1 - decay) * weights

The average is kept in fp32, one tensor per trainable parameter, on the weights' device or in host
memory (`device: cpu`). Under FSDP each rank averages its own shards: the EMA is sharded like the
weights, and gathered like them (`weights(reader)` runs the usual full-state gather with it applied).

Checkpoints hold it as `ema_weights.safetensors` in the weights' own format (a diffusers LoRA file, or
`{component}.{param}` for full fine-tuning): `applied()` swaps the average into the parameters, the
weights' writer runs, and the trained weights are swapped back, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

from raydiff.config import EMAConfig

EMA_FILE = "ema_weights.safetensors"


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its shard under FSDP (a DTensor), else the tensor itself."""
    return p.to_local() if isinstance(p, DTensor) else p


class EMA:
    """The EMA of `params` (the optimizer's parameters, in a fixed order)."""

    def __init__(self, params: list[torch.nn.Parameter], config: EMAConfig):
        self.params, self.config = list(params), config
        self.device = torch.device("cpu") if config.device == "cpu" else None
        self.shadow = [self._copy(p) for p in self.params]

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        local = _local(p).detach()
        return local.to(self.device or local.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After the optimizer step that made `step` steps in all."""
        c = self.config
        if step <= c.start_step:
            self.capture()
        elif (step - c.start_step) % c.every == 0:
            weights = [_local(p).detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
            torch._foreach_lerp_(self.shadow, weights, 1 - c.decay)

    @torch.no_grad()
    def capture(self) -> None:
        """Set the average to the parameters' current values."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(_local(p))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the parameters for the duration (to save or sample it); the trained weights
        are restored afterwards, bit for bit."""
        with torch.no_grad():
            trained = [self._copy(p) for p in self.params]
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    _local(p).copy_(t)

    def weights(self, read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """What `read()` (the weights' state-dict reader) returns with the average applied, copied: a reader
        may return views of the parameters (CPU tensors), which the restore would overwrite."""
        with self.applied():
            return {k: v.clone() for k, v in read().items()}
