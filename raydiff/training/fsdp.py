"""FSDP2 for full fine-tuning: the trainable models are sharded block by block across ranks, and
checkpoints move through torch's distributed state-dict API as full, unsharded CPU tensors.

Every function but `shard_module` and `mixed_precision_policy` is a collective: all ranks call it,
in the same order. Rank 0 gets the full dicts and writes them; the others get `{}`. The files are
the same as DDP's (`{name}.{param}` weights), except that the optimizer state is keyed by parameter
name (`models.transformer...`) rather than by position, so it loads back through `load_full_state`.

Build the optimizer after `shard_module`: sharding replaces each parameter with a DTensor shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from raydiff.pipelines.base import autocast_dtype, repeated_blocks

# Gathering: full tensors straight to CPU, on rank 0 only (no rank holds a second full copy on device).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Loading: rank 0 holds the full dicts; each tensor is broadcast and every rank keeps its own shard.
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """FSDP's mixed precision for `train.mixed_precision`: bf16/fp16 parameters are all-gathered for
    compute, gradients are reduced in fp32 and the sharded master weights and Adam state stay fp32."""
    dtype = autocast_dtype(mixed_precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_module(module, trainable_names: Sequence[str], mixed_precision: str = "no"):
    """Shard each trainable model of a `DiffusionTrainingModule` in place and return the module.

    One FSDP unit per block, so only one block's full parameters are live at a time (the next one
    is prefetched), then the model itself for what sits outside the blocks (embedders, final norm).
    Frozen models stay whole and replicated: they have no gradients or optimizer state to shard.
    The module stays directly callable (`module(data, generator=g)`): each sharded model is its own
    FSDP root and gathers its parameters in its forward hooks, which gradient checkpointing re-runs.
    """
    assert dist.is_initialized(), "shard_module needs a process group (Ray Train or init_process_group)"
    policy = mixed_precision_policy(mixed_precision)
    # Only the model casts its inputs; its blocks take activations already in the compute dtype and
    # side inputs (RoPE tables) as the model made them. FSDP2 before torch 2.13 skipped that cast when
    # checkpointing recomputed a block, so the recompute saw fp32 where the forward had bf16 and
    # checkpointing refused (FLUX on an H200, torch 2.11).
    block_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                        cast_forward_inputs=False)
    mesh = None
    for name in trainable_names:
        model = module.models[name]
        if mesh is None:  # the models' device, not torch's default accelerator: CPU runs on a GPU box work too
            mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
        for block in repeated_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return module


def full_state_dict(module, trainable_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Collective. Rank 0: the trainable models' full weights, CPU and contiguous, as `{name}.{param}`
    (the format of `DiffusionTrainingModule.trainable_state_dict`); other ranks: `{}`."""
    weights = {}
    for name in trainable_names:
        state = get_model_state_dict(module.models[name], options=_GATHER)
        weights.update({f"{name}.{k}": v.contiguous() for k, v in state.items()})
    return weights if dist.get_rank() == 0 else {}


def optimizer_state(module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective. Rank 0: the full optimizer state keyed by parameter name (plain tensors and
    numbers, loadable with `torch.load(weights_only=True)`); other ranks: `{}`."""
    state = get_optimizer_state_dict(module, optimizer, options=_GATHER)
    if dist.get_rank() != 0:
        return {}
    # Unsharded CPU state (Adam's `step`) comes back by reference, not gathered: without a copy the
    # next optimizer step would change a dict that is meant to be a snapshot.
    live = {t.untyped_storage().data_ptr() for s in optimizer.state.values() for t in s.values()
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)}
    return tree_map_only(torch.Tensor, lambda t: t.clone() if t.untyped_storage().data_ptr() in live else t, state)


def load_full_state(module, trainable_names: Sequence[str], weights: dict | None,
                    optimizer: torch.optim.Optimizer | None = None, optim_state: dict | None = None) -> None:
    """Collective. Restore every rank's shards from full dicts that only rank 0 needs to hold
    (`full_state_dict` / `optimizer_state` output read back from disk); other ranks may pass None."""
    weights = weights or {}
    for name in trainable_names:
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        assert own or dist.get_rank() != 0, f"no weights for {name!r} in the checkpoint"
        set_model_state_dict(module.models[name], own, options=_SCATTER)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optim_state or {}, options=_SCATTER)


@contextmanager
def no_gradient_sync(module, trainable_names: Sequence[str]):
    """Accumulate gradients locally (no reduce-scatter) until the last micro-batch of a window,
    as DDP's `no_sync`."""
    models = [module.models[name] for name in trainable_names]
    for model in models:
        model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for model in models:
            model.set_requires_gradient_sync(True)
