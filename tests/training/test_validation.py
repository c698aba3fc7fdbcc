"""Validation samples and `raydiff sample` on the tiny FLUX model: files, sizes, base vs LoRA, and that
sampling leaves the training state (LoRA enabled, train flags, requires_grad) as it found it."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raydiff.launch.sample import sample
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.training import lora as lora_lib
from raydiff.training.module import switch_pipe_to_training_mode
from raydiff.training.validation import ValidationSettings, write_validation

pytestmark = pytest.mark.usefixtures("sample_command")  # started first, read last

SETTINGS = ValidationSettings(prompts=["a red circle", "a blue square"], steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """(training pipe with a non-zero LoRA, its LoRA config, a checkpoint dir holding that LoRA)."""
    pipe = FluxImagePipeline.from_pretrained(tiny_model("flux"), max_sequence_length=16)
    config = switch_pipe_to_training_mode(pipe, lora_base_model="transformer",
                                          lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_rank=4)
    g = torch.Generator().manual_seed(0)
    for name, p in pipe.pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5  # B = 0 at init would make the LoRA a no-op
    checkpoint = str(tmp_path_factory.mktemp("lora-checkpoint"))
    lora_lib.save_lora(checkpoint, lora_lib.lora_state_dict(pipe.pipe.transformer, "transformer"), config)
    return pipe, config, checkpoint


def transformer_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    conditions = {"prompt_embeds": torch.randn(1, 16, 32, generator=g),
                  "pooled_prompt_embeds": torch.randn(1, 32, generator=g), "text_ids": torch.zeros(16, 3),
                  "guidance": torch.ones(1)}
    with torch.no_grad():
        return pipe.model_fn(latents, torch.tensor([0.5]), **conditions)


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if isinstance(image, str) else image).astype(int)


def test_write_validation_grid_of_base_and_lora(trained, tmp_path):
    pipe, _, _ = trained
    dit = pipe.pipe.transformer
    before = transformer_output(pipe)
    flags = {n: m.training for n, m in dit.named_modules()}
    grads = {n: p.requires_grad for n, p in dit.named_parameters()}
    assert dit.training and not pipe.pipe.vae.training

    result = write_validation(str(tmp_path), pipe, None, SETTINGS)

    assert result["grid"] == str(tmp_path / "samples" / "grid.png")
    assert result["samples"] == [str(tmp_path / "samples" / f"{i}.png") for i in range(2)]
    samples = [Image.open(p) for p in result["samples"]]
    assert all(s.size == (32, 32) for s in samples)
    grid = Image.open(result["grid"])
    assert grid.size == (64, 64)  # a column per prompt; top row base model, bottom row LoRA
    for i, s in enumerate(samples):
        base, lora = grid.crop((32 * i, 0, 32 * i + 32, 32)), grid.crop((32 * i, 32, 32 * i + 32, 64))
        assert (pixels(lora) == pixels(s)).all()
        assert np.abs(pixels(base) - pixels(lora)).mean() > 0.5

    assert torch.equal(transformer_output(pipe), before)  # LoRA enabled again, same weights
    assert {n: m.training for n, m in dit.named_modules()} == flags
    assert {n: p.requires_grad for n, p in dit.named_parameters()} == grads
    assert not pipe.pipe.vae.training


def test_full_fine_tuning_validates_without_a_base_row(tiny_model, tmp_path):
    """With no adapter to disable (full fine-tuning, a ControlNet) there is no base row: the loop's once-per-run
    base sampling gives None instead of ending the run at its first checkpoint."""
    from raydiff.training.validation import sample_base_images

    pipe = FluxImagePipeline.from_pretrained(tiny_model("flux"), max_sequence_length=16)
    switch_pipe_to_training_mode(pipe, trainable_models=["transformer"])
    assert sample_base_images(pipe, SETTINGS) is None
    result = write_validation(str(tmp_path), pipe, None, SETTINGS)
    assert Image.open(result["grid"]).size == (64, 32)  # one row: the samples
    assert (pixels(Image.open(result["grid"]).crop((32, 0, 64, 32))) == pixels(result["samples"][1])).all()


def test_lora_state_dict_is_sampled_then_training_weights_restored(trained, tmp_path):
    pipe, _, _ = trained
    before = transformer_output(pipe)
    current = lora_lib.lora_state_dict(pipe.pipe.transformer, "transformer")
    base_images = [Image.new("RGB", (32, 32), "black")] * 2  # given: no base sampling
    same = write_validation(str(tmp_path / "same"), pipe, None, SETTINGS, base_images=base_images)
    loaded = write_validation(str(tmp_path / "loaded"), pipe, current, SETTINGS, base_images=base_images)
    zero = write_validation(str(tmp_path / "zero"), pipe, {k: torch.zeros_like(v) for k, v in current.items()},
                            SETTINGS, base_images=base_images)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(same["samples"], loaded["samples"]))
    assert any((pixels(a) != pixels(b)).any() for a, b in zip(same["samples"], zero["samples"]))
    assert (pixels(Image.open(same["grid"]).crop((0, 0, 64, 32))) == 0).all()
    assert torch.equal(transformer_output(pipe), before)


def test_sample_applies_lora_scale(trained, tiny_model, tmp_path):
    _, _, checkpoint = trained
    model = tiny_model("flux")
    kwargs = dict(steps=2, height=32, width=48, seed=3)
    base = sample(model, None, "a red circle", str(tmp_path / "base.png"), **kwargs)
    off = sample(model, checkpoint, "a red circle", str(tmp_path / "off.png"), lora_scale=0.0, **kwargs)
    on = sample(model, f"{checkpoint}/{lora_lib.LORA_FILE}", "a red circle", str(tmp_path / "on.png"), **kwargs)
    assert Image.open(on).size == (48, 32)
    assert (pixels(base) == pixels(off)).all()
    assert np.abs(pixels(base) - pixels(on)).mean() > 0.5


def test_sample_loads_a_full_fine_tuning_checkpoint(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from raydiff.registry import get_pipeline_class
    from raydiff.training.checkpoint import FULL_WEIGHTS_FILE

    model = tiny_model("flux")
    state = get_pipeline_class("flux").from_pretrained(model, components=["transformer"]).pipe.transformer.state_dict()
    kwargs = dict(steps=2, height=32, width=32, seed=3)
    base = sample(model, None, "a red circle", str(tmp_path / "base.png"), **kwargs)
    for name, scale in [("same", 1.0), ("trained", 1.5)]:
        os.makedirs(tmp_path / name)
        save_file({f"transformer.{k}": (v * scale).contiguous() for k, v in state.items()},
                  str(tmp_path / name / FULL_WEIGHTS_FILE))
    same = sample(model, str(tmp_path / "same"), "a red circle", str(tmp_path / "same.png"), **kwargs)
    trained = sample(model, str(tmp_path / "trained"), "a red circle", str(tmp_path / "trained.png"), **kwargs)
    assert (pixels(base) == pixels(same)).all()
    assert np.abs(pixels(base) - pixels(trained)).mean() > 0.5


# What cli.py does with add_sample_parser, in a fresh process as `raydiff sample` would run.
CLI = """import argparse, sys
from raydiff.launch.sample import add_sample_parser
parser = argparse.ArgumentParser(prog="raydiff")
add_sample_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
args.func(args)
"""


@pytest.fixture(scope="module")
def sample_command(start_command, trained, tiny_model, tmp_path_factory):
    """(output path, `raydiff sample` of `trained`'s LoRA in a fresh process): started at the module's first
    test, so that its seconds of imports on one core overlap the other tests."""
    out = tmp_path_factory.mktemp("sample-command") / "cli.png"
    argv = ["sample", "--model", tiny_model("flux"), "--lora", trained[2], "--prompt", "a red circle",
            "--out", str(out),
            "--lora-scale", "0.5", "--steps", "2", "--height", "32", "--width", "32"]
    return out, start_command([sys.executable, "-c", CLI, *argv], env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_sample_command_line(sample_command):
    out, command = sample_command
    run = command.result(timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    assert Image.open(out).size == (32, 32)
