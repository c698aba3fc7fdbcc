"""FLUX.1 (dev / schnell): T5 + CLIP prompts, 16-channel VAE, 2x2-packed latents, a rectified-flow DiT."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from raydiff.pipelines.base import PipelineUnit, from_pretrained
from raydiff.training.flow_matching import DynamicShift, FlowSchedule

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX sees 2x2 latent patches as tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents`."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) RoPE positions (0, row, col) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --- units -----------------------------------------------------------------------------------

def _shape_check(p: "FluxImagePipeline", inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]
    factor = p.vae_scale_factor * 2
    if h % factor or w % factor:
        raise ValueError(f"FLUX needs image sides divisible by {factor}; got {h}x{w}")
    return {"height": h, "width": w}


def _prompt_embedder(p: "FluxImagePipeline", inputs: dict) -> dict:
    prompt_embeds, pooled, text_ids = p.pipe.encode_prompt(
        prompt=list(inputs["prompt"]), prompt_2=None, device=p.device, max_sequence_length=p.max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}


def _input_image_embedder(p: "FluxImagePipeline", inputs: dict) -> dict:
    vae = p.pipe.vae
    image = inputs["image"].to(p.device, vae.dtype)
    # The distribution's mode, not a sample: deterministic, so cached and inline latents agree.
    latents = vae.encode(image).latent_dist.mode()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return {"latents": latents.float()}


def _guidance(p: "FluxImagePipeline", inputs: dict) -> dict:
    if not p.pipe.transformer.config.guidance_embeds:  # schnell has no guidance embedding
        return {"guidance": None}
    return {"guidance": torch.full((inputs["latents"].shape[0],), p.guidance, device=p.device)}


class FluxImagePipeline:
    family = "flux"
    diffusers_class = FluxPipeline
    dit_name = "transformer"
    component_names = COMPONENTS
    schedule = FlowSchedule(shift=3.0, sigma_min=0.003 / 1.002, dynamic=DynamicShift(256, 4096, 0.5, 1.15))
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, pipe: FluxPipeline, device, *, guidance: float = 1.0, max_sequence_length: int | None = None):
        self.pipe, self.device = pipe, torch.device(device)
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length or 512
        self.units = [
            PipelineUnit("shape_check", _shape_check, ("image",), ("height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",),
                         ("prompt_embeds", "pooled_prompt_embeds", "text_ids"), ("text_encoder", "text_encoder_2")),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
            PipelineUnit("guidance", _guidance, ("latents",), ("guidance",), ("transformer",)),
        ]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    from_pretrained = classmethod(from_pretrained)

    def model_fn(self, latents, sigma, *, prompt_embeds, pooled_prompt_embeds, text_ids, guidance=None, **_):
        dit = self.pipe.transformer
        h, w = latents.shape[-2:]
        pred = dit(
            hidden_states=pack_latents(latents).to(dit.dtype),
            timestep=sigma.to(dit.dtype),  # FLUX's transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds.to(dit.dtype),
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            txt_ids=text_ids,
            img_ids=latent_image_ids(h, w, latents.device, dit.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(pred, h, w).float()

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        from raydiff.pipelines import tiny_parts

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)
        # Two levels: 2x spatial downsampling, like the real 8x VAE in miniature.
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                            norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035, sample_size=32)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                            text_encoder=tiny_parts.clip_text_model(seed + 1),
                            tokenizer=tiny_parts.clip_tokenizer(),
                            text_encoder_2=tiny_parts.t5_encoder(seed + 2), tokenizer_2=tiny_parts.t5_tokenizer())
        pipe.save_pretrained(path)
