"""FSDP2 full fine-tuning of the Z-Image, FLUX.2 [klein] and Wan DiTs on 2 gloo ranks (no Ray): every repeated
block becomes its own FSDP unit, and one sharded step gives the single-process weights and gradient norm.
The FLUX.1 case, with gathering, resume and clipping, is tests/training/test_fsdp.py; this reuses its step.
One spawn trains every family (process start dominates the time); the tests read what rank 0 wrote."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from test_fsdp import TRAINABLE, WORLD, assert_same, free_port, sharded, train_step

from raydiff.config import parse_config, to_dict
from raydiff.pipelines.base import repeated_blocks
from raydiff.training.fsdp import full_state_dict
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

pytestmark = pytest.mark.slow  # two spawned ranks load the models: minutes on 2 cores
MAX_SEQUENCE_LENGTH = {"z_image": 64, "flux2_klein": 32, "wan": 16}  # wan: trained on stills


def config(family: str, path: str):
    return parse_config({
        "model": {"family": family, "path": path, "max_sequence_length": MAX_SEQUENCE_LENGTH[family]},
        "data": {"metadata_path": "unused.csv", "height": 32, "width": 32},
        "lora": None,
        # Adam divides by |g| + eps: at eps 1e-8, gradients of ~1e-9 (Z-Image's time embedding has some) turn
        # last-bit differences between the 1-thread ranks and this process into 1e-5 weight differences.
        "train": {"learning_rate": 1e-3, "trainable_models": TRAINABLE, "gradient_checkpointing": True,
                  "adam_eps": 1e-4},
    })


def _worker(rank: int, port: int, cfg_dicts: dict, out: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for family, cfg_dict in cfg_dicts.items():
            module, optimizer, params = sharded(parse_config(cfg_dict))
            dit = module.models["transformer"]
            assert isinstance(dit, FSDPModule) and all(isinstance(b, FSDPModule) for b in repeated_blocks(dit))
            norm = train_step(module, optimizer, params, 0)
            weights = full_state_dict(module, TRAINABLE)
            if rank == 0:
                save_file(weights, f"{out}/{family}_step1.safetensors")
                torch.save(torch.tensor([norm]), f"{out}/{family}_norm.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-families")
    cfgs = {family: to_dict(config(family, tiny_model(family))) for family in MAX_SEQUENCE_LENGTH}
    torch.multiprocessing.spawn(_worker, args=(free_port(), cfgs, str(out)), nprocs=WORLD)
    return out


@pytest.mark.parametrize("family", sorted(MAX_SEQUENCE_LENGTH))
def test_sharded_full_fine_tuning_matches_one_process(family, fsdp_run, tiny_model):
    cfg = config(family, tiny_model(family))
    module = PipelineTrainingModule(cfg)
    params = module.trainable_parameters()
    norm = train_step(module, build_optimizer(cfg, params, total_steps=2)[0], params, 0)
    assert_same(load_file(f"{fsdp_run}/{family}_step1.safetensors"), module.trainable_state_dict())
    torch.testing.assert_close(torch.load(f"{fsdp_run}/{family}_norm.pt"), torch.tensor([norm]), rtol=1e-5, atol=0)
