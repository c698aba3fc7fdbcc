"""Qwen-Image family: parity with diffusers' QwenImagePipeline on a tiny random model, latent
normalisation, LoRA round trip through diffusers, the training schedule and one training step."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import diffusers
import pytest
import torch

from raydiff.config import load_config, parse_config
from raydiff.pipelines.base import run_units
from raydiff.pipelines.qwen_image import QwenImagePipeline
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "qwen_image"
PROMPTS = ["a red circle", "two blue squares on green grass"]  # different lengths: a padded batch
H, W = 32, 48  # pixels; latents 8x12, 4x6 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qwen_image") / "tiny"
    QwenImagePipeline.write_tiny(str(path))
    return str(path)


def load_raydiff(path: str, **options) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(path, dtype=torch.float32, device="cpu", **options)


def tiny_config(tiny_dir: str, **lora):
    raw = load_config(EXAMPLES / "tiny.yaml").model_dump(mode="json")
    raw["model"]["path"] = tiny_dir
    raw["lora"].update(lora)
    return parse_config(raw)


def run_diffusers(pipe, prompts, max_sequence_length):
    """Sample 2 steps and capture every transformer call's kwargs and output."""
    calls = []
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((kwargs, out[0].detach())), with_kwargs=True)
    try:
        pipe(prompt=prompts, height=H, width=W, num_inference_steps=2, true_cfg_scale=1.0, output_type="latent",
             max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("prompts,max_sequence_length", [
    (PROMPTS[:1], 512),  # one prompt: diffusers passes no mask
    (PROMPTS, 512),  # padded batch: a real mask
    (PROMPTS, 4),  # truncated below both prompt lengths: no padding left
])
def test_parity_with_diffusers(tiny_dir, prompts, max_sequence_length):
    ref = diffusers.QwenImagePipeline.from_pretrained(tiny_dir)
    calls = run_diffusers(ref, prompts, max_sequence_length)
    assert len(calls) == 2
    ours = load_raydiff(tiny_dir, max_sequence_length=max_sequence_length)
    cond = run_units(ours, {"prompt": prompts}, [u for u in ours.units if u.name == "prompt_embedder"])

    # (a) the prompt unit gives the embeddings (and mask) the pipeline fed its transformer
    kw = calls[0][0]
    torch.testing.assert_close(cond["prompt_embeds"], kw["encoder_hidden_states"], atol=1e-6, rtol=0)
    ref_mask = kw["encoder_hidden_states_mask"]
    assert (ref_mask is None) == bool(cond["prompt_embeds_mask"].all())
    if ref_mask is not None:
        assert torch.equal(cond["prompt_embeds_mask"], ref_mask)
    assert cond["prompt_embeds"].shape[1] <= max_sequence_length

    # (b) model_fn on the unpacked latents at the pipeline's sigma gives its prediction
    sigmas = ref.scheduler.timesteps / 1000  # the pipeline passes timestep / 1000
    worst = 0.0
    for (kw, out), sigma in zip(calls, sigmas):
        torch.testing.assert_close(kw["timestep"], sigma.expand(len(prompts)))
        latents = ref._unpack_latents(kw["hidden_states"], H, W, ref.vae_scale_factor)[:, :, 0]
        expected = ref._unpack_latents(out, H, W, ref.vae_scale_factor)[:, :, 0]
        with torch.no_grad():
            pred = ours.model_fn(latents, sigma.expand(len(prompts)).float(), **cond)
        assert pred.shape == latents.shape == (len(prompts), 4, H // 4, W // 4) and pred.dtype == torch.float32
        worst = max(worst, (pred - expected).abs().max().item())
    assert worst < 1e-5, worst


def test_image_latents_are_normalised_vae_mode(tiny_dir):
    ours = load_raydiff(tiny_dir)
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = run_units(ours, {"image": image}, [u for u in ours.units if u.name == "input_image_embedder"])["latents"]
    assert latents.shape == (2, 4, H // 4, W // 4) and latents.dtype == torch.float32

    vae = ours.pipe.vae
    with torch.no_grad():
        raw = vae.encode(image[:, :, None]).latent_dist.mode()  # (B, C, 1, h, w)
    # The pipeline decodes `x / latents_std + latents_mean` with latents_std = 1 / std; invert that.
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, ((raw - mean) * inv_std)[:, :, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((latents[:, :, None] / inv_std + mean), raw, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(latents, raw[:, :, 0], atol=1e-2)  # the tiny VAE's stats are non-trivial

    with pytest.raises(ValueError, match="divisible by 8"):
        run_units(ours, {"image": image[..., :36]}, ours.units[1:])


def test_lora_round_trip_through_diffusers(tiny_dir):
    # The real recipe's targets (attention + MLPs) with alpha != rank, so the saved metadata matters.
    targets = load_config(EXAMPLES / "lora_qwen_image.yaml").lora.target_modules
    module = PipelineTrainingModule(tiny_config(tiny_dir, target_modules=targets, rank=4, alpha=8))
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    lora_dir = Path(tiny_dir).parent / "lora"
    save_lora(str(lora_dir), module.trainable_state_dict(), module.lora_config)

    ours = module.pipe
    cond = run_units(ours, {"prompt": PROMPTS}, ours.units[:1])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 0.8])
    fresh = QwenImagePipeline(diffusers.QwenImagePipeline.from_pretrained(tiny_dir), "cpu")
    with torch.no_grad():
        base = fresh.model_fn(latents, sigma, **cond)
        records = []

        class Capture(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        handler, diffusers_logger = Capture(logging.INFO), logging.getLogger("diffusers")
        diffusers_logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fresh.pipe.load_lora_weights(str(lora_dir))
        finally:
            diffusers_logger.removeHandler(handler)
        messages = records + [str(w.message) for w in caught]
        assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
        with_lora = fresh.model_fn(latents, sigma, **cond)
        ours_pred = ours.model_fn(latents, sigma, **cond)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, ours_pred, atol=1e-4, rtol=0)


def test_schedule_defaults(tiny_dir):
    grid = QwenImagePipeline.schedule.grid()
    assert grid.shape == (1000,)
    assert grid[0].item() == pytest.approx(1.0)
    assert grid[-1].item() == pytest.approx(0.02)

    def shifted(s):  # exponential shift with mu = 0.8
        return math.exp(0.8) / (math.exp(0.8) + 1 / s - 1)

    # shift_terminal: 1 - s' is scaled so that the last grid point (sigma 0.001) lands on 0.02.
    scale = (1 - shifted(0.001)) / (1 - 0.02)
    assert grid[500].item() == pytest.approx(1 - (1 - shifted(0.5)) / scale, abs=1e-12)
    assert grid[500].item() == pytest.approx(0.6955, abs=1e-4)  # by hand: 0.6900 shifted, then stretched

    # The dynamic shift is the released scheduler's, which write_tiny copies.
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler").config
    dyn = QwenImagePipeline.schedule.dynamic
    assert (dyn.base_seq, dyn.max_seq, dyn.base_shift, dyn.max_shift) == (
        sched.base_image_seq_len, sched.max_image_seq_len, sched.base_shift, sched.max_shift)
    assert dyn.mu(64 * 64) == pytest.approx(0.5 + 0.4 * (4096 - 256) / (8192 - 256))  # 1024x1024 px


def test_training_step_updates_only_lora(tiny_dir):
    assert get_pipeline_class("qwen_image") is QwenImagePipeline
    module = PipelineTrainingModule(tiny_config(tiny_dir))  # gradient checkpointing on, as in the example
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "prompt": PROMPTS}
    loss = module(batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, so A's grads are 0


def test_dit_only_load_trains_from_precomputed_conditions(tiny_dir):
    full = load_raydiff(tiny_dir)
    data = run_units(full, {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "prompt": PROMPTS})
    data = {k: v.detach() for k, v in data.items() if k not in ("image", "prompt")}

    module = PipelineTrainingModule(tiny_config(tiny_dir), components=["transformer"])
    pipe = module.pipe.pipe
    assert pipe.vae is None and pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.transformer is not None
    assert module.units_to_run(data) == []
    loss = module(data, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_example_configs_validate():
    real = load_config(EXAMPLES / "lora_qwen_image.yaml")
    assert real.model.family == "qwen_image" and real.model.path == "Qwen/Qwen-Image"
    assert real.model.dtype == "bfloat16" and real.ray.use_gpu and real.ray.num_workers == 8
    assert real.ray.storage_path.startswith("s3://") and real.train.gradient_checkpointing
    assert set(QwenImagePipeline.default_lora_targets) <= set(real.lora.target_modules)
    tiny = load_config(EXAMPLES / "tiny.yaml")
    assert tiny.model.family == "qwen_image" and tiny.model.path.endswith("models/tiny-qwen_image")
    assert tiny.data.metadata_path.endswith("data/shapes/metadata.csv") and tiny.ray.num_workers == 1
