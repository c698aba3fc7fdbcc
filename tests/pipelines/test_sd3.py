"""SD3 family: parity with diffusers' StableDiffusion3Pipeline, latents, LoRA round trip, schedule, a training step."""

import contextlib
import logging
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import get_peft_model_state_dict

from raydiff.config import load_config, parse_config
from raydiff.pipelines.base import run_units
from raydiff.pipelines.sd3 import SD3ImagePipeline
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sd3"
MAX_SEQ = 16  # T5 tokens; short keeps the tests fast and still exercises truncation/padding
PROMPTS = ["a red cube on a table", "blue sky"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    SD3ImagePipeline.write_tiny(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return SD3ImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQ)


def unit(p, name):
    return next(u for u in p.units if u.name == name)


def images(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, size, size), generator=g) * 2 - 1


def make_module(tiny_dir, **train):
    cfg = parse_config({
        "model": {"family": "sd3", "path": tiny_dir, "max_sequence_length": MAX_SEQ},
        "data": {"metadata_path": "unused.csv"},
        "lora": {"rank": 4, "target_modules": SD3ImagePipeline.default_lora_targets},
        "train": train,
    })
    return PipelineTrainingModule(cfg)


def test_registry_and_protocol_attributes():
    assert get_pipeline_class("sd3") is SD3ImagePipeline
    assert SD3ImagePipeline.diffusers_class is StableDiffusion3Pipeline
    assert SD3ImagePipeline.dit_name == "transformer"


# --- parity with the diffusers pipeline ------------------------------------------------------


def test_prompt_and_model_fn_match_diffusers_pipeline(tiny_dir, pipe):
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_dir)  # float32: the saved dtype
    calls = []

    def capture(module, args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    reference.transformer.register_forward_hook(capture, with_kwargs=True)
    reference(PROMPTS, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,  # no CFG: batch = prompts
              max_sequence_length=MAX_SEQ, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(calls) == 2

    with torch.no_grad():  # as the pipeline encodes (no_grad picks other SDPA kernels on some CPUs)
        cond = unit(pipe, "prompt_embedder")(pipe, {"prompt": PROMPTS})
    kwargs0 = calls[0][0]
    # (a) [77 CLIP tokens + MAX_SEQ T5 tokens] x T5 width, pooled 2 x 32.
    assert cond["prompt_embeds"].shape == (2, 77 + MAX_SEQ, 64) and cond["pooled_prompt_embeds"].shape == (2, 64)
    torch.testing.assert_close(cond["prompt_embeds"], kwargs0["encoder_hidden_states"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], kwargs0["pooled_projections"], atol=1e-6, rtol=0)

    # (b) each denoising step: SD3's transformer saw t = 1000 sigma and unpacked (B, C, h, w) latents.
    sigmas = reference.scheduler.sigmas
    max_diff = 0.0
    for step, (kwargs, out) in enumerate(calls):
        sigma = kwargs["timestep"] / 1000
        torch.testing.assert_close(sigma, sigmas[step].expand(2), atol=1e-6, rtol=0)
        with torch.no_grad():
            pred = pipe.model_fn(kwargs["hidden_states"], sigma, **cond)
        assert pred.dtype == torch.float32 and pred.shape == kwargs["hidden_states"].shape == (2, 4, 16, 16)
        max_diff = max(max_diff, (pred - out).abs().max().item())
    print(f"sd3 model_fn vs diffusers transformer call: max abs diff {max_diff:.3g}")
    assert max_diff < 1e-5


# --- latents ------------------------------------------------------------------------------------


def test_latents_are_the_vae_mode_normalised_as_the_pipeline_denormalises(pipe):
    image = images()
    out = run_units(pipe, {"image": image, "prompt": PROMPTS},
                    [unit(pipe, "shape_check"), unit(pipe, "input_image_embedder")])
    vae = pipe.pipe.vae
    side = 32 // pipe.vae_scale_factor
    assert out["latents"].shape == (2, vae.config.latent_channels, side, side)
    assert (out["height"], out["width"]) == (32, 32)
    with torch.no_grad():
        mode = vae.encode(image).latent_dist.mode()
    # StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor`: undoing that gives the VAE mode.
    torch.testing.assert_close(out["latents"] / vae.config.scaling_factor + vae.config.shift_factor, mode)
    with pytest.raises(ValueError, match="divisible by 2"):
        unit(pipe, "shape_check")(pipe, {"image": torch.zeros(1, 3, 33, 32)})


# --- LoRA round trip through diffusers -------------------------------------------------------------


@contextlib.contextmanager
def collected_messages():
    """Every diffusers/peft log record and Python warning raised inside the block, as strings.
    diffusers' loggers do not propagate to the root logger, so caplog would miss them."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, loggers = Collect(level=logging.DEBUG), [logging.getLogger("diffusers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_lora_saved_by_raydiff_loads_into_diffusers(tiny_dir, tmp_path):
    module = make_module(tiny_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = module.trainable_state_dict()
    # Every default target is present in the tiny model, both streams and the dual-attention block.
    assert any(".attn.to_add_out." in k for k in state) and any(".attn2.to_q." in k for k in state)
    save_lora(str(tmp_path), state, module.lora_config)

    p = module.pipe
    cond = unit(p, "prompt_embedder")(p, {"prompt": PROMPTS})
    latents = torch.randn((2, 4, 16, 16), generator=g)
    sigma = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = p.model_fn(latents, sigma, **cond)

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_dir)  # float32: the saved dtype

    def dit():
        with torch.no_grad():
            return fresh.transformer(hidden_states=latents, timestep=sigma * 1000,
                                     encoder_hidden_states=cond["prompt_embeds"],
                                     pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    base = dit()
    with collected_messages() as messages:
        fresh.load_lora_weights(str(tmp_path))
    # diffusers notes that the file holds no text-encoder LoRA (true: only the DiT is trained); its
    # boilerplate says "unexpected", so drop exactly that notice before looking for key mismatches.
    notices = [m for m in messages if m.startswith("No LoRA keys associated to CLIPTextModelWithProjection")]
    bad = [m for m in messages if m not in notices and ("missing" in m.lower() or "unexpected" in m.lower())]
    assert not bad, bad
    # And directly: diffusers holds exactly our adapter tensors (diffusers' own warnings skip some mismatches).
    (adapter,) = fresh.get_active_adapters()
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=adapter)
    assert {f"transformer.{k}" for k in loaded} == set(state)
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[f"transformer.{k}"], atol=0, rtol=0)
    with_lora = dit()
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, ours, atol=1e-4, rtol=0)


# --- schedule ------------------------------------------------------------------------------------


def test_schedule_is_static_shift_3_on_the_1001_point_grid(tiny_dir):
    s = SD3ImagePipeline.schedule
    assert s.shift == 3.0 and s.mu is None and s.dynamic is None and s.sigma_min == 0.0
    grid = s.grid()
    assert grid.shape == (1000,)
    assert grid[0].item() == 1.0
    # last base sigma 0.001 -> 3 * 0.001 / (1 + 2 * 0.001) = 0.003 / 1.002
    assert grid[-1].item() == pytest.approx(0.003 / 1.002, rel=1e-12)
    # index 500: base 0.5 -> 1.5 / 2 = 0.75; index 750: base 0.25 -> 0.75 / 1.5 = 0.5
    assert grid[500].item() == pytest.approx(0.75, rel=1e-12)
    assert grid[750].item() == pytest.approx(0.5, rel=1e-12)
    # The sampler the tiny (and the real) model ships with uses the same static shift.
    sampler = StableDiffusion3Pipeline.from_pretrained(tiny_dir, transformer=None, vae=None, text_encoder=None,
                                                       text_encoder_2=None, text_encoder_3=None).scheduler
    assert sampler.config.shift == 3.0 and not sampler.config.use_dynamic_shifting


# --- training --------------------------------------------------------------------------------------


def test_training_step_grads_only_on_lora(tiny_dir):
    module = make_module(tiny_dir)  # gradient checkpointing on, as in real runs
    loss = module({"image": images(), "prompt": PROMPTS}, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # B starts at zero, so only B gets a non-zero gradient on the first step.
    assert any(p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)
    assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)


def test_dit_only_load_skips_encoders_and_trains_on_cached_inputs(tiny_dir, pipe):
    dit_only = SD3ImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", components=["transformer"])
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(dit_only.pipe, name) is None, name
    assert dit_only.pipe.transformer is not None

    # A batch that carries the encode units' outputs (as a cache would) needs only the DiT.
    cached = run_units(pipe, {"image": images(), "prompt": PROMPTS})
    cfg = parse_config({"model": {"family": "sd3", "path": tiny_dir}, "data": {"metadata_path": "unused.csv"}})
    module = PipelineTrainingModule(cfg, components=["transformer"])
    batch = {k: v for k, v in cached.items() if k != "image"}
    assert module.units_to_run(batch) == []
    loss = module(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# --- example configs --------------------------------------------------------------------------------


def test_example_configs_validate():
    real = load_config(EXAMPLES / "lora_sd35_medium.yaml")
    assert real.model.family == "sd3" and real.model.path == "stabilityai/stable-diffusion-3.5-medium"
    assert real.model.dtype == "bfloat16" and real.ray.use_gpu and real.ray.num_workers == 8
    assert real.ray.storage_path.startswith("s3://") and real.train.gradient_checkpointing
    tiny = load_config(EXAMPLES / "tiny.yaml")
    assert tiny.model.family == "sd3" and tiny.model.path.endswith("models/tiny-sd3")
    assert tiny.ray.num_workers == 1 and tiny.data.metadata_path.endswith("data/shapes/metadata.csv")


def test_tiny_example_config_trains_a_step(tiny_dir):
    cfg = load_config(EXAMPLES / "tiny.yaml")
    cfg.model.path = tiny_dir
    module = PipelineTrainingModule(cfg)
    size = cfg.data.height
    loss = module({"image": images(batch=cfg.train.batch_size, size=size), "prompt": PROMPTS[:cfg.train.batch_size]},
                  generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
