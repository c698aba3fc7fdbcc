"""Stable Diffusion 3 / 3.5: two CLIPs + T5 prompts, 16-channel VAE, an MMDiT that patchifies latents itself."""

from __future__ import annotations

import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, scaled_vae_latents
from raydiff.pipelines.controlnet import CONTROL_IMAGE
from raydiff.registry import DataKeys

# --- units -----------------------------------------------------------------------------------

def _shape_check(p: SD3ImagePipeline, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]
    factor = p.vae_scale_factor * p.patch_size
    if h % factor or w % factor:
        raise ValueError(f"SD3 needs image sides divisible by {factor}; got {h}x{w}")
    return {"height": h, "width": w}


def _prompt_embedder(p: SD3ImagePipeline, inputs: dict) -> dict:
    # The pipeline's public encoder, so training sees exactly what sampling feeds the DiT:
    # [CLIP-L ‖ CLIP-G hidden states, zero-padded to T5 width] ++ T5 tokens, and pooled CLIP-L ‖ CLIP-G.
    prompt_embeds, _, pooled, _ = p.pipe.encode_prompt(
        prompt=list(inputs["prompt"]), prompt_2=None, prompt_3=None, device=p.device,
        do_classifier_free_guidance=False, max_sequence_length=p.max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def _input_image_embedder(p: SD3ImagePipeline, inputs: dict) -> dict:
    return {"latents": scaled_vae_latents(p.pipe.vae, inputs["image"])}


class SD3ImagePipeline(FamilyPipeline):
    family = "sd3"
    diffusers_class = StableDiffusion3Pipeline
    # The optional IP-adapter parts (image_encoder, feature_extractor) are never trained or loaded.
    component_names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                       "tokenizer_2", "tokenizer_3")
    # SD3/3.5 train with a static shift of 3 over DiffSynth's 1000-step grid (docs/flow_matching.md).
    schedule = FlowSchedule(shift=3.0)
    # Joint attention on both streams: image (to_*) and text (add_*_proj, to_add_out), as most SD3.5 recipes do.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    # model.quantize leaves these as loaded: embedders, AdaLayerNorm modulation linears, the final projection.
    quantize_skip = ("context_embedder", "time_text_embed.*", "*norm*", "proj_out")

    default_max_sequence_length = 256  # StableDiffusion3Pipeline's default
    data_keys = DataKeys(("image",), (CONTROL_IMAGE,))
    controlnet_class, controlnet_pipeline_class = SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    # from_transformer's default of one extra channel is the inpainting ControlNet's mask.
    controlnet_init = {"num_extra_conditioning_channels": 0}
    controlnet_residuals = {"controlnet_block_samples": "block_controlnet_hidden_states"}
    controlnet_refused = ("extra_conditioning_channels",)

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("shape_check", _shape_check, ("image",), ("height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",), ("prompt_embeds", "pooled_prompt_embeds"),
                         ("text_encoder", "text_encoder_2", "text_encoder_3")),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
        ]

    @property
    def patch_size(self) -> int:
        dit = self.pipe.transformer  # StableDiffusion3ControlNetPipeline has no `patch_size` of its own
        return dit.config.patch_size if dit is not None else 2  # SD3's when the DiT is not loaded

    def model_fn(self, latents, sigma, *, prompt_embeds, pooled_prompt_embeds, control_latents=None, **_):
        dit = self.pipe.transformer
        # SD3's DiT patchifies (B, C, h, w) itself and, unlike FLUX's, takes the timestep in [0, 1000].
        pred = self.call_dit(
            control_latents,
            hidden_states=latents.to(dit.dtype),
            timestep=(sigma * 1000).to(dit.dtype),
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            pooled_projections=pooled_prompt_embeds.to(dit.dtype),
        )
        return pred.float()

    def encode_control(self, image: torch.Tensor) -> torch.Tensor:
        # SD3ControlNetPipeline: a ControlNet trained with zero pooled projections (InstantX's, and the class
        # default) takes the control latents scaled without the VAE's shift.
        shift = 0.0 if self.controlnet_setting("force_zeros_for_pooled_projection") else None
        return scaled_vae_latents(self.pipe.vae, image, shift)

    def controlnet_inputs(self, dit_kwargs: dict, control_latents: torch.Tensor) -> dict:
        config, pooled = self.controlnet.config, dit_kwargs["pooled_projections"]
        return {  # as SD3ControlNetPipeline calls it: latents unpacked (its patch embedding packs them)
            "hidden_states": dit_kwargs["hidden_states"], "timestep": dit_kwargs["timestep"],
            # SD3.5's 8B ControlNets have no text input; InstantX's see zero pooled projections.
            "encoder_hidden_states": dit_kwargs["encoder_hidden_states"] if config.joint_attention_dim else None,
            "pooled_projections": torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            "controlnet_cond": control_latents,
        }

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from raydiff.pipelines import tiny_parts

        torch.manual_seed(seed)
        # encode_prompt pads CLIP-L ‖ CLIP-G (2 x 32) to the T5 width, so T5 d_model = joint_attention_dim = 64;
        # narrower, F.pad with a negative width would silently crop the CLIP features. Pooled = 2 x 32.
        # Two layers: only the last block is context-only, so block 0 has to_add_out like the real model;
        # rms qk-norm and a dual-attention block (attn2) make it an SD3.5-Medium in miniature.
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
            qk_norm="rms_norm", dual_attention_layers=(0,))
        vae = tiny_parts.autoencoder_kl(scaling_factor=1.5305)  # SD3's own scale
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=tiny_parts.clip_text_model(seed + 1, projection=True), tokenizer=tiny_parts.clip_tokenizer(),
            text_encoder_2=tiny_parts.clip_text_model(seed + 2, projection=True),
            tokenizer_2=tiny_parts.clip_tokenizer(),
            text_encoder_3=tiny_parts.t5_encoder(seed + 3, d_model=64), tokenizer_3=tiny_parts.t5_tokenizer())
        pipe.save_pretrained(path)
