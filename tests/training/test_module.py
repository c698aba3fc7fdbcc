"""The training module, loss and checkpoint I/O without Ray: fast checks of what the loop relies on."""

import json

import pytest
import torch
from safetensors import safe_open

from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer, step_seed


@pytest.fixture
def module_and_cfg(make_config):
    cfg = make_config()
    return PipelineTrainingModule(cfg), cfg


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"][:n]}


def test_only_lora_parameters_train(module_and_cfg):
    module, _ = module_and_cfg
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    loss = module(batch(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(p.grad is None for n, p in module.named_parameters() if not p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_A" in n or "lora_B" in n)


def test_same_generator_seed_gives_same_loss(module_and_cfg):
    module, _ = module_and_cfg
    with torch.no_grad():
        a = module(batch(), generator=torch.Generator().manual_seed(5))
        b = module(batch(), generator=torch.Generator().manual_seed(5))
        c = module(batch(), generator=torch.Generator().manual_seed(6))
    assert a == b and a != c


def test_loss_on_a_fixed_batch_goes_down(make_config):
    cfg = make_config(train={"learning_rate": 1e-2, "gradient_checkpointing": True})
    torch.manual_seed(0)  # the LoRA A init
    module = PipelineTrainingModule(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=30)
    data = batch()
    eval_seeds = range(100, 104)  # same noise and sigmas before and after: only the weights change

    def eval_loss():
        with torch.no_grad():
            return sum(module(data, generator=torch.Generator().manual_seed(s)).item() for s in eval_seeds)

    before = eval_loss()
    for step in range(30):
        loss = module(data, generator=torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)  # measured: 5.30 -> 4.29 with this seed


def test_step_seeds_are_distinct_per_rank_step_and_micro_batch():
    seeds = {step_seed(0, s, m, r, 2) for s in range(50) for m in range(4) for r in range(2)}
    assert len(seeds) == 50 * 4 * 2


def test_checkpoint_roundtrip_restores_weights_optimizer_and_schedule(module_and_cfg, tmp_path):
    module, cfg = module_and_cfg
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=10)
    for step in range(3):
        module(batch(), generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    state = TrainerState(global_step=3, epoch=0, batches_in_epoch=3, log_history=[{"step": 3, "loss": 0.5}])
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, state, "model: {}\n")

    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and ".default." not in k for k in keys)
    meta = json.loads(meta["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 4
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 3

    fresh = PipelineTrainingModule(cfg)
    opt2, sched2 = build_optimizer(cfg, fresh.trainable_parameters(), total_steps=10)
    restored = load_checkpoint(str(tmp_path), fresh, opt2, sched2)
    assert restored == state
    for a, b in zip(module.trainable_parameters(), fresh.trainable_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3


def test_init_from_a_kohya_export_reproduces_the_lora(make_config, tmp_path):
    """`lora.init_from` accepts other tools' formats, rescaled to this run's alpha."""
    from raydiff.launch.cli import main as cli

    cfg = make_config(lora={"rank": 4, "alpha": 8})
    module = PipelineTrainingModule(cfg)
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=1)
    save_checkpoint(str(tmp_path / "ckpt"), module, optimizer, scheduler, TrainerState(), "model: {}\n")
    cli(["export", str(tmp_path / "ckpt"), "--format", "kohya", "--family", "flux",
         "--out", str(tmp_path / "k.safetensors")])

    restarted = PipelineTrainingModule(
        make_config(lora={"rank": 4, "alpha": 4, "init_from": str(tmp_path / "k.safetensors")}))
    data = batch()
    with torch.no_grad():
        a = module(data, generator=torch.Generator().manual_seed(3))
        b = restarted(data, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_empty_and_very_long_prompts_train(module_and_cfg):
    """An empty caption and a 10,000-character one: the tokenizers truncate, nothing crashes."""
    module, _ = module_and_cfg
    data = {"image": torch.zeros(2, 3, 32, 32), "prompt": ["", "a red circle " * 800]}
    loss = module(data, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
