"""FLUX.1 (dev / schnell): T5 + CLIP prompts, 16-channel VAE, 2x2-packed latents, a rectified-flow DiT."""

from __future__ import annotations

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

from raydiff.diffusion.flow_matching import DynamicShift, FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, pack_latents, scaled_vae_latents, unpack_latents
from raydiff.pipelines.controlnet import CONTROL_IMAGE
from raydiff.registry import DataKeys


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) RoPE positions (0, row, col) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --- units -----------------------------------------------------------------------------------

def _shape_check(p: FluxImagePipeline, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]
    factor = p.vae_scale_factor * 2
    if h % factor or w % factor:
        raise ValueError(f"FLUX needs image sides divisible by {factor}; got {h}x{w}")
    return {"height": h, "width": w}


def _prompt_embedder(p: FluxImagePipeline, inputs: dict) -> dict:
    prompt_embeds, pooled, text_ids = p.pipe.encode_prompt(
        prompt=list(inputs["prompt"]), prompt_2=None, device=p.device, max_sequence_length=p.max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}


def _input_image_embedder(p: FluxImagePipeline, inputs: dict) -> dict:
    return {"latents": scaled_vae_latents(p.pipe.vae, inputs["image"])}


def _guidance(p: FluxImagePipeline, inputs: dict) -> dict:
    if not p.pipe.transformer.config.guidance_embeds:  # schnell has no guidance embedding
        return {"guidance": None}
    return {"guidance": torch.full((inputs["latents"].shape[0],), p.guidance, device=p.device)}


# --- LoRA names in BFL's original checkpoints (ComfyUI, kohya) ----------------------------------
# Original projections are fused: double_blocks.N.img_attn.qkv = to_q|to_k|to_v and
# single_blocks.N.linear1 = to_q|to_k|to_v|proj_mlp (FLUX's MLP is 4x wide).

_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
# The double blocks' attention, named alike in FLUX.1 and FLUX.2 (raydiff.pipelines.flux2 reuses it).
DOUBLE_ATTENTION_NAMES = {
    "double_blocks.{i}.img_attn.qkv": ((_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"), (1, 1, 1)),
    "double_blocks.{i}.txt_attn.qkv": ((_D + "attn.add_q_proj", _D + "attn.add_k_proj", _D + "attn.add_v_proj"),
                                       (1, 1, 1)),
    "double_blocks.{i}.img_attn.proj": ((_D + "attn.to_out.0",), None),
    "double_blocks.{i}.txt_attn.proj": ((_D + "attn.to_add_out",), None),
}
ORIGINAL_NAMES = {
    **DOUBLE_ATTENTION_NAMES,
    "double_blocks.{i}.img_mlp.0": ((_D + "ff.net.0.proj",), None),
    "double_blocks.{i}.img_mlp.2": ((_D + "ff.net.2",), None),
    "double_blocks.{i}.txt_mlp.0": ((_D + "ff_context.net.0.proj",), None),
    "double_blocks.{i}.txt_mlp.2": ((_D + "ff_context.net.2",), None),
    "double_blocks.{i}.img_mod.lin": ((_D + "norm1.linear",), None),
    "double_blocks.{i}.txt_mod.lin": ((_D + "norm1_context.linear",), None),
    "single_blocks.{i}.linear1": ((_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
                                  (1, 1, 1, 4)),
    "single_blocks.{i}.linear2": ((_S + "proj_out",), None),
    "single_blocks.{i}.modulation.lin": ((_S + "norm.linear",), None),
}

# DiffSynth-Studio's FLUX DiT keeps BFL's fused layers under its own names (diffsynth/models/flux_dit.py;
# FluxLoRAConverter.align_to_opensource_format in diffsynth/utils/lora/flux.py maps them to BFL's).
DIFFSYNTH_NAMES = {
    "blocks.{i}.norm1_a.linear": "double_blocks.{i}.img_mod.lin",
    "blocks.{i}.norm1_b.linear": "double_blocks.{i}.txt_mod.lin",
    "blocks.{i}.attn.a_to_qkv": "double_blocks.{i}.img_attn.qkv",
    "blocks.{i}.attn.b_to_qkv": "double_blocks.{i}.txt_attn.qkv",
    "blocks.{i}.attn.a_to_out": "double_blocks.{i}.img_attn.proj",
    "blocks.{i}.attn.b_to_out": "double_blocks.{i}.txt_attn.proj",
    "blocks.{i}.ff_a.0": "double_blocks.{i}.img_mlp.0",
    "blocks.{i}.ff_a.2": "double_blocks.{i}.img_mlp.2",
    "blocks.{i}.ff_b.0": "double_blocks.{i}.txt_mlp.0",
    "blocks.{i}.ff_b.2": "double_blocks.{i}.txt_mlp.2",
    "single_blocks.{i}.norm.linear": "single_blocks.{i}.modulation.lin",
    "single_blocks.{i}.to_qkv_mlp": "single_blocks.{i}.linear1",
    "single_blocks.{i}.proj_out": "single_blocks.{i}.linear2",
}


class FluxImagePipeline(FamilyPipeline):
    family = "flux"
    diffusers_class = FluxPipeline
    component_names = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    schedule = FlowSchedule(shift=3.0, sigma_min=0.003 / 1.002, dynamic=DynamicShift(256, 4096, 0.5, 1.15))
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    # model.quantize leaves these as loaded: embedders, AdaLayerNorm modulation linears, the final projection.
    quantize_skip = ("x_embedder", "context_embedder", "time_text_embed.*", "*norm*", "proj_out")
    shared_outputs = frozenset({"text_ids"})  # (L, 3): no batch axis, L could pass for one
    lora_original_names = ORIGINAL_NAMES
    # diffusers' FLUX loader converts `diffusion_model.` keys only on its kohya path, entered on lora_down.
    comfyui_lora_suffixes = ("lora_down", "lora_up")
    data_keys = DataKeys(("image",), (CONTROL_IMAGE,))
    controlnet_class, controlnet_pipeline_class = FluxControlNetModel, FluxControlNetPipeline
    controlnet_layers = ("num_layers", "num_single_layers")
    controlnet_residuals = {"controlnet_block_samples": "controlnet_block_samples",
                            "controlnet_single_block_samples": "controlnet_single_block_samples"}
    # XLabs' ControlNets read the control image in pixels through a hint block; union ControlNets need a mode.
    controlnet_refused = ("conditioning_embedding_channels", "num_mode")
    # DiffSynth's FLUX loader renames only `lora_unet_` and `transformer.` keys onto its fused modules; the kohya
    # layout is what its own FLUX recipe saves (--align_to_opensource_format) and it loads exactly.
    diffsynth_lora_format = "kohya"
    diffsynth_lora_names = DIFFSYNTH_NAMES

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("shape_check", _shape_check, ("image",), ("height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",),
                         ("prompt_embeds", "pooled_prompt_embeds", "text_ids"), ("text_encoder", "text_encoder_2")),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
            PipelineUnit("guidance", _guidance, ("latents",), ("guidance",), ("transformer",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, pooled_prompt_embeds, text_ids, guidance=None,
                 control_latents=None, **_):
        h, w = latents.shape[-2:]
        ids = latent_image_ids(h, w, latents.device, self.pipe.transformer.dtype)
        pred = self.denoise_tokens(pack_latents(latents), sigma, ids, prompt_embeds=prompt_embeds,
                                   pooled_prompt_embeds=pooled_prompt_embeds, text_ids=text_ids, guidance=guidance,
                                   control_latents=control_latents)
        return unpack_latents(pred, h, w).float()

    def denoise_tokens(self, tokens, sigma, img_ids, *, prompt_embeds, pooled_prompt_embeds, text_ids,
                       guidance=None, control_latents=None) -> torch.Tensor:
        """The transformer on packed image tokens (B, L, 4C) with their RoPE positions `img_ids` (L, 3) -> its output
        (B, L, 4C) (Kontext puts its reference's tokens after the target's); with `model.controlnet`, after the
        ControlNet on `control_latents` (`call_dit`)."""
        dit = self.pipe.transformer
        return self.call_dit(
            control_latents,
            hidden_states=tokens.to(dit.dtype),
            timestep=sigma.to(dit.dtype),  # FLUX's transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds.to(dit.dtype),
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            txt_ids=text_ids,
            img_ids=img_ids,
        )

    def controlnet_inputs(self, dit_kwargs: dict, control_latents: torch.Tensor) -> dict:
        inputs = super().controlnet_inputs(dit_kwargs, control_latents)
        # FluxControlNetPipeline gives the ControlNet a guidance value only if it has a guidance embedding.
        b = control_latents.shape[0]
        embeds = self.controlnet.config.guidance_embeds
        inputs["guidance"] = torch.full((b,), self.guidance, device=control_latents.device) if embeds else None
        return inputs

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        FluxPipeline(**tiny_components(seed)).save_pretrained(path)


def tiny_components(seed: int) -> dict:
    """Every component of a tiny FLUX.1 pipeline (FLUX.1 Kontext's too: the same transformer class)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from raydiff.pipelines import tiny_parts

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return dict(scheduler=scheduler, vae=tiny_parts.autoencoder_kl(scaling_factor=1.5035), transformer=transformer,
                text_encoder=tiny_parts.clip_text_model(seed + 1), tokenizer=tiny_parts.clip_tokenizer(),
                text_encoder_2=tiny_parts.t5_encoder(seed + 2), tokenizer_2=tiny_parts.t5_tokenizer())
