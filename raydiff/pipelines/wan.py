"""Wan 2.1 text-to-video: UMT5 prompts, a causal 3D VAE (8x space, 4x time), a DiT that patchifies itself."""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit


def normalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, C, f, h, w) VAE means -> per-channel standardised latents; the inverse of WanPipeline's
    decode-time `latents * std + mean`."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(mean, dtype=torch.float32, device=latents.device).view(shape)
    std = torch.tensor(std, dtype=torch.float32, device=latents.device).view(shape)
    return (latents.float() - mean) / std


# --- units -----------------------------------------------------------------------------------

def _shape_check(p: WanVideoPipeline, inputs: dict) -> dict:
    video = inputs["video"]
    if video.ndim != 5:
        raise ValueError(f"Wan expects video (B, 3, F, H, W); got shape {tuple(video.shape)} (an image is F=1)")
    f, h, w = video.shape[-3:]
    t, s = p.pipe.vae_scale_factor_temporal, p.pipe.vae_scale_factor_spatial * 2  # x2: the DiT's 2x2 patches
    if (f - 1) % t or h % s or w % s:
        raise ValueError(f"Wan needs frames = {t}k + 1 and sides divisible by {s}; got {f} frames of {h}x{w}")
    return {"num_frames": f, "height": h, "width": w}


def _prompt_embedder(p: WanVideoPipeline, inputs: dict) -> dict:
    # No negative prompt: training runs at cfg_scale 1. Padding positions are zeroed, as at inference.
    prompt_embeds, _ = p.pipe.encode_prompt(prompt=list(inputs["prompt"]), do_classifier_free_guidance=False,
                                            max_sequence_length=p.max_sequence_length, device=p.device)
    return {"prompt_embeds": prompt_embeds}


def _input_video_embedder(p: WanVideoPipeline, inputs: dict) -> dict:
    vae = p.pipe.vae
    video = inputs["video"].to(p.device, vae.dtype)
    # The distribution's mode, not a sample: deterministic, so cached and inline latents agree.
    latents = vae.encode(video).latent_dist.mode()
    return {"latents": normalize_latents(latents, vae.config.latents_mean, vae.config.latents_std)}


class WanVideoPipeline(FamilyPipeline):
    family = "wan"
    diffusers_class = WanPipeline
    component_names = ("transformer", "vae", "text_encoder", "tokenizer")
    schedule = FlowSchedule(shift=5.0)  # DiffSynth: linspace(1, 0, 1001)[:-1], static shift 5
    # Attention (self attn1 and cross attn2) and the MLP: what DiffSynth / musubi Wan LoRAs train.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    # model.quantize leaves these as loaded: the time/text embedders and the final projection (Wan modulates
    # with per-block scale_shift_table parameters, not linears).
    quantize_skip = ("condition_embedder.*", "proj_out")

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("shape_check", _shape_check, ("video",), ("num_frames", "height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",), ("prompt_embeds",), ("text_encoder",)),
            PipelineUnit("input_video_embedder", _input_video_embedder, ("video",), ("latents",), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, **_):
        """latents (B, 16, f, h, w), sigma (B,) -> velocity (B, 16, f, h, w) float32."""
        dit = self.pipe.transformer
        pred = dit(
            hidden_states=latents.to(dit.dtype),  # the DiT patchifies (1, 2, 2) and builds its RoPE itself
            timestep=sigma.float() * 1000,  # Wan's DiT takes the scheduler timestep, not sigma; fp32 as WanPipeline
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            return_dict=False,
        )[0]
        return pred.float()

    def image_seq_len(self, latents: torch.Tensor) -> int:
        pt, ph, pw = self.pipe.transformer.config.patch_size if self.pipe.transformer is not None else (1, 2, 2)
        f, h, w = latents.shape[-3:]
        return (f // pt) * (h // ph) * (w // pw)

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        from raydiff.pipelines import tiny_parts

        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        # Default latents_mean/std are the real Wan 2.1 ones, so the normalisation is exercised for real.
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        # Euler so sigma = t / 1000 exactly; the real checkpoint ships UniPC (flow_shift 3), same timestep scale.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        pipe = WanPipeline(tokenizer=tiny_parts.t5_tokenizer(), text_encoder=umt5_encoder(seed + 1), vae=vae,
                           scheduler=scheduler, transformer=transformer)
        pipe.save_pretrained(path)


def umt5_encoder(seed: int, d_model: int = 32):
    """Tiny UMT5 (WanPipeline's declared text-encoder class; UMT5 has a relative bias per layer, unlike T5),
    with tiny_parts.t5_encoder's sizes and tiny_parts.t5_tokenizer's special ids."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(d_model=d_model, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32, vocab_size=256, feed_forward_proj="gated-gelu",
                     is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg)
