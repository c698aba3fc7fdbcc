"""Z-Image: raydiff's units and model_fn against diffusers' ZImagePipeline on a tiny random checkpoint,
latents, the schedule, LoRA in diffusers and ComfyUI naming, training, the encode path, sampling, FSDP blocks."""

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
from raydiff.pipelines.z_image import ZImagePipeline
from raydiff.registry import BUILTIN_PIPELINES, get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.lora_formats import to_format

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "z_image"
H, W = 32, 48  # pixels; tiny VAE 2x -> latents 16x24, 8x12 tokens of 2x2


@pytest.fixture(scope="module")
def tiny_dir(tiny_model) -> str:
    return tiny_model("z_image")


def config(tiny_dir, *overrides):
    return tiny_config(EXAMPLES / "tiny.yaml", tiny_dir, *overrides)


def test_registered_family():
    assert get_pipeline_class("z_image") is ZImagePipeline
    assert BUILTIN_PIPELINES["z_image"] == (ZImagePipeline.diffusers_class.__name__,)


def run_diffusers(pipe, prompts, max_sequence_length):
    """Sample 2 steps without CFG (one transformer call per step); capture every call's inputs and output."""
    calls = []
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((args, out[0])), with_kwargs=True)
    # A copy: ZImagePipeline writes the chat-templated prompts into the list it is given.
    pipe(list(prompts), height=H, width=W, num_inference_steps=2, guidance_scale=0.0, output_type="latent",
         max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(0))
    return calls


@pytest.mark.parametrize("prompts,max_sequence_length", [
    (PROMPTS, 512),  # different lengths: padded in raydiff's batch, dropped again in model_fn
    (PROMPTS[:1], 512),
    (PROMPTS, 24),  # truncated below both templated prompts
])
def test_parity_with_diffusers(tiny_dir, prompts, max_sequence_length):
    ref = diffusers.ZImagePipeline.from_pretrained(tiny_dir)
    calls = run_diffusers(ref, prompts, max_sequence_length)
    assert len(calls) == 2
    ours = ZImagePipeline.from_pretrained(tiny_dir, max_sequence_length=max_sequence_length)
    cond = conditions(ours, prompts)

    # (a) the prompt unit's padded embeddings, unpadded by the mask, are the per-prompt list the DiT was given
    captions = calls[0][0][2]
    mask = cond["prompt_embeds_mask"]
    assert mask.sum(1).tolist() == [len(c) for c in captions] and max(len(c) for c in captions) <= max_sequence_length
    for embeds, m, caption in zip(cond["prompt_embeds"], mask, captions):
        torch.testing.assert_close(embeds[m.bool()], caption, atol=0, rtol=0)
        assert not embeds[~m.bool()].any()

    # (b) model_fn on the pipeline's latents at its own sigmas is minus the DiT's output, which saw 1 - sigma
    sigmas = ref.scheduler.timesteps / 1000
    worst = 0.0
    for ((clips, t, _), out), sigma in zip(calls, sigmas):
        sigma = sigma.expand(len(prompts))
        torch.testing.assert_close(t, 1 - sigma)
        latents = torch.stack(clips)[:, :, 0]
        with torch.no_grad():
            pred = ours.model_fn(latents, sigma, **cond)
        assert pred.shape == latents.shape == (len(prompts), 4, H // 2, W // 2) and pred.dtype == torch.float32
        worst = max(worst, (pred + torch.stack(out)[:, :, 0]).abs().max().item())
    assert worst < 1e-5, worst


def test_image_latents_invert_the_decode_normalisation(tiny_dir):
    ours = ZImagePipeline.from_pretrained(tiny_dir)
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = run_units(ours, {"image": image}, [u for u in ours.units if u.name != "prompt_embedder"])
    vae = ours.pipe.vae
    with torch.no_grad():
        raw = vae.encode(image).latent_dist.mode()
    assert out["latents"].shape == (2, 4, H // 2, W // 2) and (out["height"], out["width"]) == (H, W)
    # ZImagePipeline decodes `latents / scaling_factor + shift_factor`: undoing that gives the VAE's mode.
    torch.testing.assert_close(out["latents"] / vae.config.scaling_factor + vae.config.shift_factor, raw)
    assert not torch.allclose(out["latents"], raw, atol=1e-2)
    with pytest.raises(ValueError, match="divisible by 4"):
        run_units(ours, {"image": image[..., :46]}, ours.units[:1])


def test_schedule_defaults(tiny_dir):
    s = ZImagePipeline.schedule
    assert s.shift == 3.0 and s.mu is None and s.dynamic is None and s.sigma_min == 0.0
    grid = s.grid()
    assert grid.shape == (1000,) and grid[0].item() == 1.0
    assert grid[500].item() == pytest.approx(0.75, rel=1e-12)  # base 0.5 -> 1.5 / 2
    assert grid[-1].item() == pytest.approx(0.003 / 1.002, rel=1e-12)  # base 0.001
    # The tiny model ships the released Z-Image-Turbo scheduler config: static shift 3, no dynamic shifting.
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler").config
    assert sched.shift == 3.0 and not sched.use_dynamic_shifting


def test_lora_loads_into_diffusers_without_key_warnings(tiny_dir, tmp_path, lora_key_warnings):
    cfg = config(tiny_dir, "lora.alpha=8")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    check_lora_loads_into_diffusers(cfg, ZImagePipeline, str(tmp_path), latents, lora_key_warnings)


def test_training_step_updates_only_lora(tiny_dir):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    check_training_step_updates_only_lora(config(tiny_dir), images)


def test_encoded_batches_give_the_inline_loss(tiny_dir):
    check_encoded_batches_give_the_inline_loss(config(tiny_dir), config(tiny_dir, "data.preprocess=stream"), 32)


def test_raydiff_sample(tiny_dir, tmp_path):
    cfg = config(tiny_dir, "lora.alpha=8")
    module = trained_module(cfg, scale=1.0)
    lora_dir = tmp_path / "lora"
    save_lora(str(lora_dir), module.trainable_state_dict(), module.lora_config)
    check_sample("z_image", tiny_dir, str(lora_dir), tmp_path)


def test_fsdp_wraps_every_block(tiny_dir):
    dit = ZImagePipeline.from_pretrained(tiny_dir, components=["transformer"]).pipe.transformer
    blocks = repeated_blocks(dit)
    # 2 main layers + 1 noise refiner + 1 context refiner, each a ZImageTransformerBlock (diffusers' _repeated_blocks)
    assert len(blocks) == 4 and {type(b).__name__ for b in blocks} == set(dit._repeated_blocks)
    assert set(map(id, blocks)) == {id(m) for m in dit.modules() if type(m).__name__ in dit._repeated_blocks}


def test_example_configs_validate():
    real = load_config(EXAMPLES / "lora_z_image.yaml")
    assert real.model.family == "z_image" and real.model.path == "Tongyi-MAI/Z-Image"
    assert real.model.dtype == "bfloat16" and real.ray.use_gpu and real.train.gradient_checkpointing
    assert real.lora.target_modules == ZImagePipeline.default_lora_targets and real.lora.rank == 32
    tiny = load_config(EXAMPLES / "tiny.yaml")
    assert tiny.model.family == "z_image" and tiny.model.path.endswith("models/tiny-z_image")
    assert tiny.ray.num_workers == 1 and tiny.data.metadata_path.endswith("data/shapes/metadata.csv")


# --- ComfyUI's mapping, transcribed ------------------------------------------------------------
# ComfyUI loads Z-Image as a Lumina2 model. comfy/lora.py `model_lora_keys_unet`:
#     if isinstance(model, comfy.model_base.Lumina2):
#         diffusers_keys = comfy.utils.z_image_to_diffusers(model.model_config.unet_config,
#                                                           output_prefix="diffusion_model.")
#         for k in diffusers_keys:
#             if k.endswith(".weight"):
#                 to = diffusers_keys[k]
#                 key_lora = k[:-len(".weight")]
#                 key_map["diffusion_model.{}".format(key_lora)] = to
#                 key_map["transformer.{}".format(key_lora)] = to
#                 key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = to
#                 key_map[key_lora] = to
# and comfy/utils.py `z_image_to_diffusers` (its .weight entries; biases and norms need no LoRA):


def comfyui_z_image_to_diffusers(n_layers: int, n_refiner_layers: int, dim: int, prefix="diffusion_model.") -> dict:
    key_map = {}

    def add_block_keys(frm, to, has_adaln=True):
        qkv = f"{to}.attention.qkv.weight"
        key_map[f"{frm}.attention.to_q.weight"] = (qkv, (0, 0, dim))
        key_map[f"{frm}.attention.to_k.weight"] = (qkv, (0, dim, dim))
        key_map[f"{frm}.attention.to_v.weight"] = (qkv, (0, dim * 2, dim))
        names = {"attention.to_out.0.weight": "attention.out.weight"}
        names |= {f"feed_forward.{w}.weight": f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        if has_adaln:
            names["adaLN_modulation.0.weight"] = "adaLN_modulation.0.weight"
        for k, v in names.items():
            key_map[f"{frm}.{k}"] = f"{to}.{v}"

    for i in range(n_layers):
        add_block_keys(f"layers.{i}", f"{prefix}layers.{i}")
    for i in range(n_refiner_layers):
        add_block_keys(f"context_refiner.{i}", f"{prefix}context_refiner.{i}")
        add_block_keys(f"noise_refiner.{i}", f"{prefix}noise_refiner.{i}")
    for comfy, diffusers_name in [("final_layer.linear.weight", "all_final_layer.2-1.linear.weight"),
                                  ("final_layer.adaLN_modulation.1.weight",
                                   "all_final_layer.2-1.adaLN_modulation.1.weight"),
                                  ("x_embedder.weight", "all_x_embedder.2-1.weight"),
                                  ("cap_embedder.1.weight", "cap_embedder.1.weight"),
                                  ("t_embedder.mlp.0.weight", "t_embedder.mlp.0.weight"),
                                  ("t_embedder.mlp.2.weight", "t_embedder.mlp.2.weight")]:
        key_map[diffusers_name] = prefix + comfy
    return key_map


def test_comfyui_names_are_the_keys_comfyui_maps(tiny_dir):
    """ComfyUI's Lumina2 key map covers every Linear of the DiT, each exported name is one of its keys, and
    the weight (or qkv slice) it names has the LoRA's shape."""
    dit = ZImagePipeline.from_pretrained(tiny_dir, components=["transformer"]).pipe.transformer
    cfg = dit.config
    comfy = comfyui_z_image_to_diffusers(cfg.n_layers, cfg.n_refiner_layers, cfg.dim)
    key_map = {"diffusion_model." + k[:-len(".weight")]: to for k, to in comfy.items()}
    linears = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    mapped = {k[:-len(".weight")] for k in comfy} & linears
    assert mapped == linears
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in sorted(mapped):
        out_f, in_f = dict(dit.named_modules())[name].weight.shape
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    exported = to_format(sd, "comfyui", family="z_image", alpha=8)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k[:-len(".alpha")] for k in exported}
    assert modules == {"diffusion_model." + n for n in mapped}
    assert all(m in key_map for m in modules)
    for name in mapped:
        down = exported[f"diffusion_model.{name}.lora_A.weight"]
        up = exported[f"diffusion_model.{name}.lora_B.weight"]
        target = key_map["diffusion_model." + name]
        rows = target[1][2] if isinstance(target, tuple) else dict(dit.named_modules())[name].weight.shape[0]
        assert (up @ down).shape == (rows, down.shape[1])
        assert exported[f"diffusion_model.{name}.alpha"].item() == 4  # the scale 8 / 4 is folded into B
        torch.testing.assert_close(up, 2 * sd[f"transformer.{name}.lora_B.weight"], atol=0, rtol=0)
