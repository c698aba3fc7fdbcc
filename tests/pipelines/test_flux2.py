"""FLUX.2 [klein]: raydiff's units and model_fn against diffusers' Flux2KleinPipeline on a tiny random
checkpoint, latents, the schedule, LoRA in diffusers and ComfyUI naming, training, the encode path,
sampling, FSDP blocks."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from family_checks import (
    PROMPTS,
    check_encoded_batches_give_the_inline_loss,
    check_lora_loads_into_diffusers,
    check_sample,
    check_training_step_updates_only_lora,
    conditions,
    tiny_config,
    trained_module,
)

from raydiff.config import load_config
from raydiff.pipelines.base import repeated_blocks, run_units
from raydiff.pipelines.flux2 import Flux2KleinImagePipeline, position_ids
from raydiff.registry import BUILTIN_PIPELINES, get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.lora_formats import from_format, to_format

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "flux2"
H, W = 32, 48  # pixels; tiny VAE 2x and the 2x2 patchify -> (16, 8, 12) latent grids, 96 tokens
MAX_LEN = 32


@pytest.fixture(scope="module")
def tiny_dir(tiny_model) -> str:
    return tiny_model("flux2_klein")


def config(tiny_dir, *overrides):
    return tiny_config(EXAMPLES / "tiny.yaml", tiny_dir, "data.preprocess=inline", *overrides)


def test_registered_family():
    assert get_pipeline_class("flux2_klein") is Flux2KleinImagePipeline
    assert BUILTIN_PIPELINES["flux2_klein"] == (Flux2KleinImagePipeline.diffusers_class.__name__,)


def test_parity_with_diffusers(tiny_dir):
    ref = diffusers.Flux2KleinPipeline.from_pretrained(tiny_dir)
    ref.set_progress_bar_config(disable=True)
    calls = []
    ref.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    # guidance 1: no CFG, one transformer call per step with the batch of prompts
    ref(prompt=list(PROMPTS), height=H, width=W, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
        max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2
    ours = Flux2KleinImagePipeline.from_pretrained(tiny_dir, max_sequence_length=MAX_LEN)
    cond = conditions(ours)

    # (a) the prompt unit gives the embeddings the pipeline fed its transformer (padded to MAX_LEN)
    kw0 = calls[0][0]
    assert cond["prompt_embeds"].shape == (2, MAX_LEN, 48)
    torch.testing.assert_close(cond["prompt_embeds"], kw0["encoder_hidden_states"], atol=0, rtol=0)

    # (b) model_fn on the pipeline's token grids at its own sigmas gives its prediction; the position ids
    # it builds are the pipeline's
    img_ids, txt_ids = position_ids(H // 4, W // 4, MAX_LEN, "cpu")
    assert torch.equal(kw0["img_ids"][0], img_ids) and torch.equal(kw0["txt_ids"][0], txt_ids)
    sigmas = ref.scheduler.timesteps / 1000
    worst = 0.0
    for (kw, out), sigma in zip(calls, sigmas):
        torch.testing.assert_close(kw["timestep"], sigma.expand(2))
        latents = kw["hidden_states"].transpose(1, 2).reshape(2, 16, H // 4, W // 4)
        with torch.no_grad():
            pred = ours.model_fn(latents, sigma.expand(2), **cond)
        assert pred.dtype == torch.float32
        worst = max(worst, (pred - out.transpose(1, 2).reshape(pred.shape)).abs().max().item())
    assert worst < 1e-5, worst


def test_image_latents_invert_the_decode_normalisation(tiny_dir):
    ours = Flux2KleinImagePipeline.from_pretrained(tiny_dir)
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = run_units(ours, {"image": image}, [u for u in ours.units if u.name != "prompt_embedder"])
    latents = out["latents"]
    assert latents.shape == (2, 16, H // 4, W // 4) and latents.dtype == torch.float32
    pipe = ours.pipe
    with torch.no_grad():
        raw = pipe.vae.encode(image).latent_dist.mode()
    # Flux2KleinPipeline's decode path, verbatim: x * sqrt(var + eps) + mean, then unpatchify 2x2.
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    back = pipe._unpatchify_latents(latents * std + pipe.vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(back, raw, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(latents, pipe._patchify_latents(raw), atol=1e-2)  # the statistics are non-trivial
    with pytest.raises(ValueError, match="divisible by 4"):
        run_units(ours, {"image": image[..., :46]}, ours.units[:1])


def test_schedule_defaults():
    s = Flux2KleinImagePipeline.schedule
    assert s.mu == 0.8 and s.shift is None and s.dynamic is None and s.shift_terminal is None
    grid = s.grid()
    assert grid.shape == (1000,) and grid[0].item() == pytest.approx(1.0)

    def shifted(x):  # exponential shift with mu = 0.8
        return 2.718281828459045 ** 0.8 / (2.718281828459045 ** 0.8 + 1 / x - 1)

    # DiffSynth's FLUX.2 grid: linspace(1, 1/1000, 1000), i.e. 1, 0.999, ..., 0.001, then the shift.
    assert grid[500].item() == pytest.approx(shifted(0.5), rel=1e-9)
    assert grid[500].item() == pytest.approx(0.6900, abs=1e-4)  # by hand: e^0.8 / (e^0.8 + 1) = 2.2255 / 3.2255
    assert grid[-1].item() == pytest.approx(shifted(0.001), rel=1e-9)


def test_lora_loads_into_diffusers_without_key_warnings(tiny_dir, tmp_path, lora_key_warnings):
    cfg = config(tiny_dir, "lora.alpha=8")
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    check_lora_loads_into_diffusers(cfg, Flux2KleinImagePipeline, str(tmp_path), latents, lora_key_warnings)


def test_training_step_updates_only_lora(tiny_dir):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    check_training_step_updates_only_lora(config(tiny_dir), images)


def test_encoded_batches_give_the_inline_loss(tiny_dir):
    check_encoded_batches_give_the_inline_loss(config(tiny_dir), config(tiny_dir, "data.preprocess=stream"), 32)


def test_raydiff_sample(tiny_dir, tmp_path):
    module = trained_module(config(tiny_dir, "lora.alpha=8"), scale=1.0)
    lora_dir = tmp_path / "lora"
    save_lora(str(lora_dir), module.trainable_state_dict(), module.lora_config)
    check_sample("flux2_klein", tiny_dir, str(lora_dir), tmp_path)


def test_fsdp_wraps_every_block(tiny_dir):
    dit = Flux2KleinImagePipeline.from_pretrained(tiny_dir, components=["transformer"]).pipe.transformer
    blocks = repeated_blocks(dit)
    assert [type(b).__name__ for b in blocks] == ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]
    assert set(dit._repeated_blocks) == {type(b).__name__ for b in blocks}  # diffusers' own list


def test_example_configs_validate():
    real = load_config(EXAMPLES / "lora_flux2_klein.yaml")
    assert real.model.family == "flux2_klein" and real.model.path == "black-forest-labs/FLUX.2-klein-base-4B"
    assert real.model.dtype == "bfloat16" and real.ray.use_gpu and real.train.gradient_checkpointing
    assert real.lora.target_modules == Flux2KleinImagePipeline.default_lora_targets and real.lora.rank == 32
    tiny = load_config(EXAMPLES / "tiny.yaml")
    assert tiny.model.family == "flux2_klein" and tiny.model.path.endswith("models/tiny-flux2_klein")
    assert tiny.ray.num_workers == 1 and tiny.data.preprocess == "stream"


# --- ComfyUI's names, transcribed ----------------------------------------------------------------
# ComfyUI loads FLUX.2 as comfy.model_base.Flux2, a Flux, whose model is comfy/ldm/flux/model.py `Flux` with
# global_modulation and mlp_silu_act. comfy/lora.py `model_lora_keys_unet` maps, for every weight of it,
#     key_map["{}".format(k[:-len(".weight")])] = k  # generic lora format without any weird key names
# i.e. a LoRA named `diffusion_model.<module>` patches that module's weight. Its Linear weights
# (comfy/ldm/flux/model.py, layers.py: build_mlp with mlp_silu_act, SingleStreamBlock, LastLayer, Modulation):


def comfyui_flux2_linears(depth: int, depth_single: int, hidden: int, mlp_ratio: float, in_ch: int, ctx: int,
                          out_ch: int) -> dict[str, tuple[int, int]]:
    """{ComfyUI module name: weight shape (out, in)} of a FLUX.2 `Flux` model (no guidance embedding)."""
    mlp = int(hidden * mlp_ratio)
    shapes = {"img_in": (hidden, in_ch), "txt_in": (hidden, ctx), "time_in.in_layer": (hidden, 256),
              "time_in.out_layer": (hidden, hidden), "final_layer.linear": (out_ch, hidden),
              "final_layer.adaLN_modulation.1": (2 * hidden, hidden),
              "double_stream_modulation_img.lin": (6 * hidden, hidden),
              "double_stream_modulation_txt.lin": (6 * hidden, hidden),
              "single_stream_modulation.lin": (3 * hidden, hidden)}
    for i in range(depth):
        for s in ("img", "txt"):
            shapes |= {f"double_blocks.{i}.{s}_attn.qkv": (3 * hidden, hidden),
                       f"double_blocks.{i}.{s}_attn.proj": (hidden, hidden),
                       f"double_blocks.{i}.{s}_mlp.0": (2 * mlp, hidden), f"double_blocks.{i}.{s}_mlp.2": (hidden, mlp)}
    for i in range(depth_single):
        shapes |= {f"single_blocks.{i}.linear1": (3 * hidden + 2 * mlp, hidden),
                   f"single_blocks.{i}.linear2": (hidden, hidden + mlp)}
    return shapes


def test_comfyui_names_are_comfyui_weights_of_the_lora_shape(tiny_dir):
    """Every module of the DiT a LoRA can train is exported under a ComfyUI FLUX.2 weight name whose
    shape the LoRA's up @ down has; diffusers' own FLUX.2 converter reads the file back module by module."""
    dit = Flux2KleinImagePipeline.from_pretrained(tiny_dir, components=["transformer"]).pipe.transformer
    cfg = dit.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    comfy = comfyui_flux2_linears(cfg.num_layers, cfg.num_single_layers, hidden, cfg.mlp_ratio, cfg.in_channels,
                                  cfg.joint_attention_dim, cfg.in_channels)
    modules = dict(dit.named_modules())
    # Every Linear but the final adaLN (stored with its halves swapped) has an original name.
    linears = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n != "norm_out.linear")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in linears:
        out_f, in_f = modules[name].weight.shape
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    exported = to_format(sd, "comfyui", family="flux2_klein", alpha=8)
    assert not [k for k in exported if k.endswith(".alpha")]  # alpha / r is inside lora_B
    names = {k[len("diffusion_model."):].rsplit(".", 2)[0] for k in exported}
    assert names == set(comfy) - {"final_layer.adaLN_modulation.1"}
    for name in names:
        down, up = exported[f"diffusion_model.{name}.lora_A.weight"], exported[f"diffusion_model.{name}.lora_B.weight"]
        assert (up @ down).shape == comfy[name], name

    converted = diffusers.Flux2KleinPipeline.lora_state_dict(dict(exported))
    for name in linears:  # diffusers loads with scale 1: the same update as ours at alpha 8 / r 4
        a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        x = torch.randn(a.shape[1], 8, generator=g)
        ours = 2 * sd[f"transformer.{name}.lora_B.weight"] @ (sd[f"transformer.{name}.lora_A.weight"] @ x)
        torch.testing.assert_close(b @ (a @ x), ours, atol=1e-4, rtol=1e-5)
    back, info = from_format(exported, family="flux2_klein")
    assert info == {"type": "lora", "r": 4, "lora_alpha": 4} and set(back) == set(sd)
