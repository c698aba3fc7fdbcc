"""train.optimizer without Ray: each optimizer trains the LoRA, and its state saved into a checkpoint and
loaded into a fresh optimizer gives exactly the step an uninterrupted run takes."""

import bitsandbytes as bnb
import prodigyopt
import pytest
import torch
from transformers.optimization import Adafactor

from raydiff.config import ConfigError
from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import apply_hyperparameters, build_optimizer

CLASSES = {"adamw": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit, "adafactor": Adafactor,
           "prodigy": prodigyopt.Prodigy}
# Prodigy's learning rate scales its own step-size estimate (1.0 is its default).
SETTINGS = {"adamw": {}, "adamw8bit": {}, "adafactor": {}, "prodigy": {"learning_rate": 1.0}}


def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"]}


def train(module, optimizer, scheduler, steps):
    for step in steps:
        module(batch(), generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)


def fresh(cfg):
    torch.manual_seed(0)
    module = PipelineTrainingModule(cfg)
    return (module, *build_optimizer(cfg, module.trainable_parameters(), total_steps=6))


@pytest.mark.parametrize("name", list(CLASSES))
def test_resumed_optimizer_takes_exactly_the_uninterrupted_step(name, make_config, tmp_path):
    # rank 128: LoRA A is 128 x 32 = 4096 values, the size from which bitsandbytes keeps 8-bit moments.
    cfg = make_config(train={"optimizer": name, **SETTINGS[name]}, lora={"rank": 128})
    module, optimizer, scheduler = fresh(cfg)
    assert type(optimizer) is CLASSES[name]
    before = {k: v.clone() for k, v in module.trainable_state_dict().items()}
    train(module, optimizer, scheduler, range(3))
    after = module.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trains
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, TrainerState(global_step=3), "model: {}\n")
    train(module, optimizer, scheduler, range(3, 5))

    resumed, optimizer2, scheduler2 = fresh(cfg)
    load_checkpoint(str(tmp_path), resumed, optimizer2, scheduler2)  # training_state.pt read with weights_only
    apply_hyperparameters(cfg, optimizer2, scheduler2)  # as the loop does on resume
    train(resumed, optimizer2, scheduler2, range(3, 5))
    expected, actual = module.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)  # bitwise
    if name == "adamw8bit":  # the 8-bit state really is 8-bit (and survived the round trip)
        states = [s for s in optimizer2.state.values() if "state1" in s]
        assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    if name == "prodigy":  # its step-size estimate (in the param group) came back too
        assert optimizer2.param_groups[0]["d"] == optimizer.param_groups[0]["d"] != 1e-6


def test_resume_applies_the_configs_settings_without_breaking_adafactors_own(make_config):
    cfg = make_config(train={"optimizer": "adafactor", "weight_decay": 0.05})
    _, optimizer, scheduler = fresh(cfg)
    apply_hyperparameters(cfg, optimizer, scheduler)
    group = optimizer.param_groups[0]
    assert group["eps"] == (1e-30, 1e-3) and "betas" not in group  # Adafactor's, not adam_eps
    assert group["weight_decay"] == 0.05 and group["relative_step"] is False
    assert group["lr"] == cfg.train.learning_rate


def test_optimizers_without_sharded_state_are_refused_under_fsdp(make_config):
    for name in ("adamw8bit", "adafactor", "prodigy"):
        with pytest.raises(ConfigError, match=f"train.optimizer {name} .* fsdp cannot shard; use adamw"):
            make_config(lora=None, train={"optimizer": name, "trainable_models": ["transformer"],
                                          **SETTINGS[name]}, ray={"strategy": "fsdp"})
    make_config(lora=None, train={"trainable_models": ["transformer"]}, ray={"strategy": "fsdp"})


def test_prodigy_with_an_adam_learning_rate_is_refused(make_config):
    with pytest.raises(ConfigError, match="prodigy estimates the step size"):
        make_config(train={"optimizer": "prodigy"})  # the fixture's learning_rate is 1e-3
