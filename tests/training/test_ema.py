"""train.ema without Ray: the update rule, the swap in and out of the parameters, ema_weights.safetensors
in the checkpoint (a diffusers LoRA file), a bitwise resume, and `raydiff export --ema`."""

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from raydiff.config import ConfigError, EMAConfig
from raydiff.launch.cli import main as cli
from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.ema import EMA, EMA_FILE
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer


def test_update_copies_until_start_step_then_averages_every_n_steps():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([p], EMAConfig(decay=0.5, start_step=2, every=2))
    seen = []
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], start=1):
        p.data.fill_(value)
        ema.update(step)
        seen.append(ema.shadow[0].item())
    # steps 1-2 copy; step 3 is not a multiple of `every` after start; step 4: (2 + 8) / 2; step 6: (5 + 32) / 2
    assert seen == [1.0, 2.0, 2.0, 5.0, 5.0, 18.5]


def test_applied_swaps_the_average_in_and_restores_the_weights_bitwise():
    p = torch.nn.Parameter(torch.randn(5, 3))
    trained = p.detach().clone()
    ema = EMA([p], EMAConfig(decay=0.9, device="cpu"))
    ema.shadow[0].mul_(0.5)
    with ema.applied():
        assert torch.equal(p.detach(), trained * 0.5)
    assert torch.equal(p.detach(), trained) and p.requires_grad


def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"]}


def run(cfg, steps, module=None, optimizer=None, scheduler=None, ema=None):
    if module is None:
        torch.manual_seed(0)
        module = PipelineTrainingModule(cfg)
        optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=6)
        ema = EMA(module.trainable_parameters(), cfg.train.ema)
    for step in steps:
        module(batch(), generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        ema.update(step + 1)
    return module, optimizer, scheduler, ema


def save(directory, module, optimizer, scheduler, ema, step):
    ema_weights = ema.weights(module.trainable_state_dict)
    save_checkpoint(str(directory), module, optimizer, scheduler, TrainerState(global_step=step), "model: {}\n",
                    ema_weights=ema_weights)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_ema_is_checkpointed_and_resumes_bitwise(make_config, tmp_path, lora):
    sections = {} if lora else {"lora": None, "train": {"trainable_models": ["transformer"]}}
    train = {"ema": {"decay": 0.7, "device": "cpu"}, "learning_rate": 1e-2, **sections.pop("train", {})}
    cfg = make_config(train=train, **sections)
    module, optimizer, scheduler, ema = run(cfg, range(3))
    save(tmp_path, module, optimizer, scheduler, ema, 3)
    expected_file = ema.weights(module.trainable_state_dict)
    assert not all(torch.equal(expected_file[k], v) for k, v in module.trainable_state_dict().items())
    saved = load_file(str(tmp_path / EMA_FILE))
    assert saved.keys() == expected_file.keys() and all(torch.equal(saved[k], expected_file[k]) for k in saved)
    run(cfg, range(3, 5), module, optimizer, scheduler, ema)  # uninterrupted

    torch.manual_seed(1)  # a different LoRA init: everything must come from the checkpoint
    resumed = PipelineTrainingModule(cfg)
    optimizer2, scheduler2 = build_optimizer(cfg, resumed.trainable_parameters(), total_steps=6)
    ema2 = EMA(resumed.trainable_parameters(), cfg.train.ema)
    load_checkpoint(str(tmp_path), resumed, optimizer2, scheduler2, ema=ema2)
    run(cfg, range(3, 5), resumed, optimizer2, scheduler2, ema2)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, ema2.shadow))
    expected, actual = module.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_checkpoint_without_ema_starts_the_average_at_the_restored_weights(make_config, tmp_path):
    cfg = make_config(train={"ema": {"decay": 0.7}})
    module, optimizer, scheduler, _ = run(cfg, range(2))
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, TrainerState(global_step=2), "model: {}\n")
    torch.manual_seed(1)
    resumed = PipelineTrainingModule(cfg)
    optimizer2, scheduler2 = build_optimizer(cfg, resumed.trainable_parameters(), total_steps=6)
    ema = EMA(resumed.trainable_parameters(), cfg.train.ema)
    load_checkpoint(str(tmp_path), resumed, optimizer2, scheduler2, ema=ema)
    assert all(torch.equal(s, p) for s, p in zip(ema.shadow, resumed.trainable_parameters()))


def test_ema_file_is_a_diffusers_lora_and_exports(make_config, tiny_model, tmp_path, lora_key_warnings):
    cfg = make_config(train={"ema": {"decay": 0.5}, "learning_rate": 1e-2})
    module, optimizer, scheduler, ema = run(cfg, range(2))
    ckpt = tmp_path / "ckpt"
    save(ckpt, module, optimizer, scheduler, ema, 2)
    (ckpt / "config.yaml").write_text("model: {family: flux}\n")
    with safe_open(str(ckpt / EMA_FILE), "pt") as f:  # rank and alpha in metadata, as the weights' file
        assert "lora_adapter_metadata" in f.metadata()
    pipe = diffusers.FluxPipeline.from_pretrained(tiny_model("flux"))
    assert lora_key_warnings(lambda: pipe.load_lora_weights(str(ckpt), weight_name=EMA_FILE)) == []

    cli(["export", str(ckpt), "--ema", "--format", "kohya", "--out", str(tmp_path / "ema_kohya.safetensors")])
    cli(["export", str(ckpt), "--format", "kohya", "--out", str(tmp_path / "kohya.safetensors")])
    ema_kohya = load_file(str(tmp_path / "ema_kohya.safetensors"))
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert ema_kohya.keys() == kohya.keys() and any(k.startswith("lora_unet_") for k in kohya)
    assert any(not torch.equal(ema_kohya[k], kohya[k]) for k in kohya)


def test_export_ema_without_ema_weights_fails_clearly(make_config, tmp_path, capsys):
    module, optimizer, scheduler, _ = run(make_config(train={"ema": {"decay": 0.5}}), range(1))
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, TrainerState(), "model: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli(["export", str(tmp_path), "--ema", "--format", "diffusers", "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2 and "has no ema_weights.safetensors" in capsys.readouterr().err


def test_use_ema_needs_an_ema(make_config):
    with pytest.raises(ConfigError, match="validation.use_ema samples with the EMA weights; set train.ema"):
        make_config(validation={"use_ema": True})
