"""FSDP2 full fine-tuning on 2 gloo ranks (no Ray): sharded training matches one process, the gathered
weights are whole and load into a plain model, a resumed run matches an uninterrupted one, and the EMA
(train.ema) averages each rank's shards and gathers to the one-process EMA.

One spawn runs every scenario (process start and model loading dominate the time); the ranks write
their results to files that the tests below read.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raydiff.config import EMAConfig, parse_config, to_dict
from raydiff.training.ema import EMA
from raydiff.training.fsdp import full_state_dict, load_full_state, optimizer_state, shard_module
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

TRAINABLE = ["transformer"]
WORLD = 2
MAX_NORM = 0.1  # below both steps' norms (0.39, 0.94): clipping is active and so is checked
EMA_CONFIG = EMAConfig(decay=0.5)


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


def _worker(rank: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on a small box
    cfg = parse_config(cfg_dict)
    try:
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
    finally:
        # Without it, a rank that leaves a rank-0-only gather first can abort the other (gloo).
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cfg(tiny_model, shapes):
    return parse_config({
        "model": {"family": "flux", "path": tiny_model("flux"), "max_sequence_length": 16},
        "data": {"base_path": shapes, "metadata_path": os.path.join(shapes, "metadata.csv"), "height": 32, "width": 32},
        "lora": None,
        "train": {"learning_rate": 1e-3, "trainable_models": TRAINABLE, "gradient_checkpointing": True},
    })


@pytest.fixture(scope="module")
def fsdp_run(cfg, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fsdp"))
    torch.multiprocessing.spawn(_worker, args=(free_port(), to_dict(cfg), out), nprocs=WORLD)
    return out


@pytest.fixture(scope="module")
def reference(cfg):
    """The same two steps in one process, without FSDP: (weights after step 2, the two grad norms, the EMA
    after step 2 in the weights' format)."""
    module = PipelineTrainingModule(cfg)
    params = module.trainable_parameters()
    optimizer = build_optimizer(cfg, params, total_steps=2)[0]
    ema = EMA(params, EMA_CONFIG)
    norms = []
    for step in range(2):
        norms.append(train_step(module, optimizer, params, step))
        ema.update(step + 1)
    return module.trainable_state_dict(), norms, ema.weights(module.trainable_state_dict)


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sharded_training_matches_one_process(fsdp_run, reference):
    weights, norms, _ = reference
    assert_same(load_file(f"{fsdp_run}/step2.safetensors"), weights)
    # clip_grad_norm_ over DTensor shards reduces across ranks: the norm of the whole gradient.
    torch.testing.assert_close(torch.load(f"{fsdp_run}/norms.pt"), torch.tensor(norms), rtol=1e-5, atol=0)
    assert min(norms) > MAX_NORM  # so clipping was active in both steps, and checked


def test_gathered_weights_are_whole_and_load_into_a_plain_model(fsdp_run, cfg, tmp_path):
    weights = load_file(f"{fsdp_run}/step2.safetensors")
    plain = PipelineTrainingModule(cfg)
    transformer = plain.models["transformer"]
    assert {k: v.shape for k, v in weights.items()} == {f"transformer.{k}": v.shape
                                                          for k, v in transformer.state_dict().items()}
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in weights.values())
    save_file(weights, str(tmp_path / "w.safetensors"))
    own = {k.removeprefix("transformer."): v for k, v in load_file(str(tmp_path / "w.safetensors")).items()}
    transformer.load_state_dict(own, strict=True)
    assert_same(plain.trainable_state_dict(), weights)


def test_resume_from_full_state_matches_uninterrupted_run(fsdp_run):
    optim = torch.load(f"{fsdp_run}/step1_optim.pt", weights_only=True)
    assert optim["state"] and all(s["step"] == 1 for s in optim["state"].values())
    assert_same(load_file(f"{fsdp_run}/resumed.safetensors"), load_file(f"{fsdp_run}/step2.safetensors"))


def test_ema_is_sharded_like_the_weights_and_gathers_to_the_one_process_ema(fsdp_run, reference):
    weights, _, ema = reference
    gathered = load_file(f"{fsdp_run}/ema.safetensors")
    assert_same(gathered, ema)
    assert any(not torch.equal(gathered[k], weights[k]) for k in weights)  # an average, not the weights
