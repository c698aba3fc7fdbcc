"""Speed and memory features on CPU: mixed precision, activation offload, regional compilation."""

import pytest
import torch

from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import Stepper, build_optimizer


def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"]}


@pytest.mark.parametrize("precision,checkpointing", [("bf16", True), ("no", "offload"), ("fp16", True)])
def test_mixed_precision_and_offload_train_with_fp32_lora(make_config, precision, checkpointing):
    cfg = make_config(train={"mixed_precision": precision, "gradient_checkpointing": checkpointing,
                             "learning_rate": 5e-3})
    module = PipelineTrainingModule(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=4)
    stepper = Stepper(cfg, module, optimizer, scheduler, torch.device("cpu"))
    before = [p.detach().clone() for p in module.trainable_parameters()]
    for step in range(2):
        loss = torch.tensor(stepper.step([batch()], step).loss)
        assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))
    if precision == "bf16":  # autocast really ran the DiT's matmuls in bf16
        seen = []
        hook = module.pipe.pipe.transformer.proj_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with stepper.autocast(), torch.no_grad():
            module(batch(), generator=torch.Generator().manual_seed(9))
        hook.remove()
        assert seen == [torch.bfloat16]


def test_compiled_blocks_train_without_recompiling(make_config):
    from torch._dynamo.utils import counters

    # aot_eager: Dynamo capture and AOTAutograd as with inductor, without minutes of C++ codegen on 2 cores.
    cfg = make_config(train={"compile": True, "compile_backend": "aot_eager", "gradient_checkpointing": False})
    module = PipelineTrainingModule(cfg)
    counters.clear()
    for step in range(3):
        loss = module(batch(), generator=torch.Generator().manual_seed(step))
        loss.backward()
        if step == 0:
            frames_after_first = counters["stats"]["unique_graphs"]
    assert torch.isfinite(loss)
    assert counters["stats"]["unique_graphs"] == frames_after_first > 0  # compiled once, reused every step
