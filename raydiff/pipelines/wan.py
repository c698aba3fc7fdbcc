"""Wan 2.1 / 2.2 text-to-video: UMT5 prompts, a causal 3D VAE, a DiT that patchifies itself.

Wan 2.2 A14B has two experts: `transformer` denoises timesteps >= boundary_ratio x 1000 (high noise) and
`transformer_2` the rest; `model.expert` picks the one a run trains (base class). Wan 2.2 TI2V-5B has one
DiT, a 16x VAE with 48 channels and `expand_timesteps`: a timestep per token. Stills train as one-frame
videos. The helpers above the class serve the image-to-video and VACE families too.
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit
from raydiff.registry import DataKeys

VIDEO_OR_IMAGE = ("video", "image")  # a unit input: the clip to denoise, or a still as a one-frame clip
# Attention (self attn1 and cross attn2) and the MLP: what DiffSynth / musubi Wan LoRAs train.
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
TINY_VARIANTS = ("wan21", "wan22_a14b", "wan22_ti2v_5b")
# DiffSynth's Wan training grid, linspace(1, 0, 1001)[:-1] with static shift 5, for every Wan model it trains
# (2.1, 2.2, image-to-video, VACE); its Wan 2.2 scripts train each expert on its share of that grid
# (timestep ids [0, 417) / [417, 1000) at T2V-A14B's boundary 0.875).
WAN_SCHEDULE = FlowSchedule(shift=5.0)


def normalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, C, f, h, w) VAE means -> per-channel standardised latents; the inverse of WanPipeline's
    decode-time `latents * std + mean`."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(mean, dtype=torch.float32, device=latents.device).view(shape)
    std = torch.tensor(std, dtype=torch.float32, device=latents.device).view(shape)
    return (latents.float() - mean) / std


def video_input(inputs: dict) -> torch.Tensor:
    """The clip to denoise, (B, 3, F, H, W): `video`, or `image` (B, 3, H, W) as a one-frame video."""
    return inputs["video"] if "video" in inputs else inputs["image"][:, :, None]


def encode_video(p: FamilyPipeline, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> normalised float32 latents (B, C, f, h, w). The distribution's mode, not
    a sample, as the Wan pipelines encode conditions (`sample_mode="argmax"`): deterministic, so cached and
    inline latents agree."""
    vae = p.pipe.vae
    latents = vae.encode(video.to(p.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(latents, vae.config.latents_mean, vae.config.latents_std)


def token_timesteps(timestep: torch.Tensor, latents: torch.Tensor, patch_size, clean_first_frame: bool = False):
    """(B,) -> (B, tokens): the per-token timesteps of Wan 2.2 TI2V-5B (`expand_timesteps`), one per
    (1, 2, 2) patch; the first latent frame's tokens at 0 when that frame is the clean image condition."""
    _, _, f, h, w = latents.shape
    mask = torch.ones(f // patch_size[0], h // patch_size[1], w // patch_size[2], device=timestep.device)
    if clean_first_frame:
        mask[0] = 0
    return timestep[:, None] * mask.flatten()[None]


def video_seq_len(dit, latents: torch.Tensor) -> int:
    """Tokens a Wan DiT (or, not loaded, its (1, 2, 2) patches) makes of (B, C, f, h, w) latents."""
    pt, ph, pw = dit.config.patch_size if dit is not None else (1, 2, 2)
    f, h, w = latents.shape[-3:]
    return (f // pt) * (h // ph) * (w // pw)


# --- units -----------------------------------------------------------------------------------

def shape_check(p: FamilyPipeline, inputs: dict) -> dict:
    video = video_input(inputs)
    if video.ndim != 5:
        raise ValueError(f"Wan expects video (B, 3, F, H, W) or image (B, 3, H, W); got {tuple(video.shape)}")
    f, h, w = video.shape[-3:]
    t, s = p.pipe.vae_scale_factor_temporal, p.pipe.vae_scale_factor_spatial * 2  # x2: the DiT's 2x2 patches
    if (f - 1) % t or h % s or w % s:
        raise ValueError(f"Wan needs frames = {t}k + 1 and sides divisible by {s}; got {f} frames of {h}x{w}")
    return {"num_frames": f, "height": h, "width": w}


def prompt_embedder(p: FamilyPipeline, inputs: dict) -> dict:
    # No negative prompt: training runs at cfg_scale 1. Padding positions are zeroed, as at inference.
    prompt_embeds, _ = p.pipe.encode_prompt(prompt=list(inputs["prompt"]), do_classifier_free_guidance=False,
                                            max_sequence_length=p.max_sequence_length, device=p.device)
    return {"prompt_embeds": prompt_embeds}


def _input_video_embedder(p: WanVideoPipeline, inputs: dict) -> dict:
    return {"latents": encode_video(p, video_input(inputs))}


# --- LoRA names in Wan's original checkpoints (ComfyUI, musubi/kohya) ---------------------------
# The official Wan module paths, which ComfyUI's WanModel keeps (comfy/ldm/wan/model.py); none is fused.

def block_names(original: str, ours: str) -> dict:
    """{original name: ((diffusers name,), None)} for the linear layers of a Wan transformer block."""
    layers = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
              "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
              "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
              "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
    return {f"{original}.{{i}}.{o}": ((f"{ours}.{{i}}.{d}",), None) for o, d in layers.items()}


ORIGINAL_NAMES = {
    **block_names("blocks", "blocks"),
    "head.head": (("proj_out",), None),
    "time_projection.1": (("condition_embedder.time_proj",), None),
    "time_embedding.0": (("condition_embedder.time_embedder.linear_1",), None),
    "time_embedding.2": (("condition_embedder.time_embedder.linear_2",), None),
    "text_embedding.0": (("condition_embedder.text_embedder.linear_1",), None),
    "text_embedding.2": (("condition_embedder.text_embedder.linear_2",), None),
    "img_emb.proj.1": (("condition_embedder.image_embedder.ff.net.0.proj",), None),
    "img_emb.proj.3": (("condition_embedder.image_embedder.ff.net.2",), None),
}


SHAPE_CHECK = PipelineUnit("shape_check", shape_check, (VIDEO_OR_IMAGE,), ("num_frames", "height", "width"))
PROMPT_EMBEDDER = PipelineUnit("prompt_embedder", prompt_embedder, ("prompt",), ("prompt_embeds",), ("text_encoder",))


class WanVideoPipeline(FamilyPipeline):
    family = "wan"
    diffusers_class = WanPipeline
    component_names = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer")
    schedule = WAN_SCHEDULE
    default_lora_targets = WAN_LORA_TARGETS
    data_keys = DataKeys(VIDEO_OR_IMAGE)
    tiny_variants = TINY_VARIANTS
    lora_original_names = ORIGINAL_NAMES
    diffsynth_lora_format = "original"  # DiffSynth\'s WanModel keeps the official names
    # model.quantize leaves these as loaded: the time/text embedders and the final projection (Wan modulates
    # with per-block scale_shift_table parameters, not linears).
    quantize_skip = ("condition_embedder.*", "proj_out")

    def make_units(self) -> list[PipelineUnit]:
        return [
            SHAPE_CHECK,
            PROMPT_EMBEDDER,
            PipelineUnit("input_video_embedder", _input_video_embedder, (VIDEO_OR_IMAGE,), ("latents",), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, **_):
        """latents (B, C, f, h, w), sigma (B,) -> velocity (B, C, f, h, w) float32."""
        dit = self.dit
        # Wan's DiT takes the scheduler timestep, not sigma; fp32 as the pipeline passes it.
        timestep = sigma.float() * 1000
        if self.pipe.config.get("expand_timesteps"):  # TI2V-5B text-to-video: every token at t
            timestep = token_timesteps(timestep, latents, dit.config.patch_size)
        pred = dit(
            hidden_states=latents.to(dit.dtype),  # the DiT patchifies (1, 2, 2) and builds its RoPE itself
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            return_dict=False,
        )[0]
        return pred.float()

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return video_seq_len(self.dit, latents)

    @staticmethod
    def write_tiny(path: str, seed: int = 0, variant: str | None = None) -> None:
        """`variant`: wan21 (default: Wan 2.1 T2V), wan22_a14b (two experts, boundary 0.875, the 2.1 VAE)
        or wan22_ti2v_5b (one DiT, the Wan 2.2 VAE: 16x space, 4x time, `expand_timesteps`)."""
        parts = tiny_components(seed, variant or "wan21")
        config = dict(boundary_ratio=0.875) if variant == "wan22_a14b" else {}
        if variant == "wan22_ti2v_5b":
            config = dict(expand_timesteps=True)
        WanPipeline(**parts, **config).save_pretrained(path)


# --- tiny parts, shared by the Wan families ----------------------------------------------------

def tiny_components(seed: int, variant: str, **transformer_kw) -> dict:
    """Tokenizer, UMT5, VAE, scheduler and transformer(s) of a tiny `variant` (TINY_VARIANTS) pipeline;
    `transformer_kw` overrides the DiT's config (image-to-video channels, a CLIP image projection)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from raydiff.pipelines import tiny_parts as common

    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny Wan variant {variant!r}; choose from {TINY_VARIANTS}")
    vae = tiny_vae(variant)

    def transformer(offset: int):
        torch.manual_seed(seed + offset)
        kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=vae.config.z_dim,
                  out_channels=vae.config.z_dim, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        return WanTransformer3DModel(**{**kw, **transformer_kw})

    # Euler so sigma = t / 1000 exactly; the real checkpoints ship UniPC, same timestep scale.
    parts = dict(tokenizer=common.t5_tokenizer(), text_encoder=umt5_encoder(seed + 1), vae=vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer(0))
    if variant == "wan22_a14b":
        parts["transformer_2"] = transformer(2)
    return parts


def tiny_vae(variant: str):
    """Wan 2.1's VAE (8x space, 16 channels, the real latents_mean/std by default), or in miniature Wan 2.2's
    (residual blocks, 2x2 pixel patches, 16x space; non-trivial mean/std so normalising is exercised)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if variant != "wan22_ti2v_5b":
        return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLWan(base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16,
                            latents_mean=[0.1 * i - 0.3 for i in range(8)],
                            latents_std=[0.5 + 0.2 * i for i in range(8)])


def umt5_encoder(seed: int, d_model: int = 32):
    """Tiny UMT5 (WanPipeline's declared text-encoder class; UMT5 has a relative bias per layer, unlike T5),
    with tiny_parts.t5_encoder's sizes and tiny_parts.t5_tokenizer's special ids."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(d_model=d_model, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32, vocab_size=256, feed_forward_proj="gated-gelu",
                     is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg)
