"""What the 2 gloo ranks of the FSDP tests run, in one spawn for both test files (tests/training/conftest.py):
process start and model loading dominate their time. tests/training/test_fsdp.py checks what the FLUX.1
scenarios wrote (sharded steps, gathering, resume, clipping, EMA); tests/training/test_fsdp_families.py
the one sharded step of each other family. Rank 0 writes the results to files that the tests read."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule

from raydiff.config import EMAConfig, parse_config
from raydiff.pipelines.base import repeated_blocks
from raydiff.training.ema import EMA
from raydiff.training.fsdp import full_state_dict, load_full_state, optimizer_state, shard_module
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

TRAINABLE = ["transformer"]
WORLD = 2
MAX_NORM = 0.1  # below both steps' norms (0.39, 0.94): clipping is active and so is checked
EMA_CONFIG = EMAConfig(decay=0.5)
# The other families, with the text length of each (wan: trained on stills).
MAX_SEQUENCE_LENGTH = {"z_image": 64, "flux2_klein": 32, "wan": 16}


def flux_config(path: str, shapes: str):
    return parse_config({
        "model": {"family": "flux", "path": path, "max_sequence_length": 16},
        "data": {"base_path": shapes, "metadata_path": os.path.join(shapes, "metadata.csv"), "height": 32, "width": 32},
        "lora": None,
        "train": {"learning_rate": 1e-3, "trainable_models": TRAINABLE, "gradient_checkpointing": True},
    })


def family_config(family: str, path: str):
    return parse_config({
        "model": {"family": family, "path": path, "max_sequence_length": MAX_SEQUENCE_LENGTH[family]},
        "data": {"metadata_path": "unused.csv", "height": 32, "width": 32},
        "lora": None,
        # Adam divides by |g| + eps: at eps 1e-8, gradients of ~1e-9 (Z-Image's time embedding has some) turn
        # last-bit differences between the 1-thread ranks and this process into 1e-5 weight differences.
        "train": {"learning_rate": 1e-3, "trainable_models": TRAINABLE, "gradient_checkpointing": True,
                  "adam_eps": 1e-4},
    })


def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"]}


def train_step(module, optimizer, params, step: int) -> float:
    """One AdamW step with clipping; the same batch and noise on every rank, so the ranks' mean
    gradient is the single-process gradient. Returns the total gradient norm before clipping."""
    module(batch(), generator=torch.Generator().manual_seed(step)).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()  # under FSDP a replicated DTensor; .item() and float() work as on a tensor


def sharded(cfg):
    module = shard_module(PipelineTrainingModule(cfg), TRAINABLE, cfg.train.mixed_precision)
    params = module.trainable_parameters()
    return module, build_optimizer(cfg, params, total_steps=2)[0], params


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(rank: int, port: int, flux: dict, families: dict, out: str) -> None:
    """The spawned rank: the FLUX.1 scenarios, then one step of each family."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on a small box
    try:
        flux_scenarios(rank, parse_config(flux), out)
        for family, cfg_dict in families.items():
            family_step(rank, family, parse_config(cfg_dict), out)
    finally:
        # Without it, a rank that leaves a rank-0-only gather first can abort the other (gloo).
        dist.barrier()
        dist.destroy_process_group()


def flux_scenarios(rank: int, cfg, out: str) -> None:
    """Two uninterrupted steps (with an EMA) saving the full state after the first, then a resume from it."""
    # Two uninterrupted steps, saving the full state after the first.
    module, optimizer, params = sharded(cfg)
    ema = EMA(params, EMA_CONFIG)  # over the DTensor shards: each rank averages its own
    norms = [train_step(module, optimizer, params, 0)]
    ema.update(1)
    weights, optim = full_state_dict(module, TRAINABLE), optimizer_state(module, optimizer)
    norms.append(train_step(module, optimizer, params, 1))
    ema.update(2)
    final = full_state_dict(module, TRAINABLE)
    averaged = ema.weights(lambda: full_state_dict(module, TRAINABLE))
    if rank == 0:  # written after step 2: the step-1 dicts must be snapshots, not live views
        save_file(weights, f"{out}/step1.safetensors")
        torch.save(optim, f"{out}/step1_optim.pt")
        save_file(final, f"{out}/step2.safetensors")
        save_file(averaged, f"{out}/ema.safetensors")
        torch.save(torch.tensor(norms), f"{out}/norms.pt")
    dist.barrier()  # rank 0's files are complete before the resume reads them

    # Resume from the step-1 files into fresh sharded modules; only rank 0 reads them.
    module, optimizer, params = sharded(cfg)
    weights = load_file(f"{out}/step1.safetensors") if rank == 0 else None
    optim = torch.load(f"{out}/step1_optim.pt", weights_only=True) if rank == 0 else None
    load_full_state(module, TRAINABLE, weights, optimizer, optim)
    train_step(module, optimizer, params, 1)
    resumed, optim = full_state_dict(module, TRAINABLE), optimizer_state(module, optimizer)
    if rank == 0:
        save_file(resumed, f"{out}/resumed.safetensors")
    else:
        assert resumed == {} and optim == {}


def family_step(rank: int, family: str, cfg, out: str) -> None:
    """One sharded step of `family`: every repeated block is its own FSDP unit."""
    module, optimizer, params = sharded(cfg)
    dit = module.models["transformer"]
    assert isinstance(dit, FSDPModule) and all(isinstance(b, FSDPModule) for b in repeated_blocks(dit))
    norm = train_step(module, optimizer, params, 0)
    weights = full_state_dict(module, TRAINABLE)
    if rank == 0:
        save_file(weights, f"{out}/{family}_step1.safetensors")
        torch.save(torch.tensor([norm]), f"{out}/{family}_norm.pt")
