"""Qwen-Image: Qwen2.5-VL prompts, a 16-channel (video-capable) VAE, 2x2-packed latents, an MMDiT.

Latents are (B, C, h, w): the VAE works on (B, C, F, H, W) clips, so the single frame axis is added
around VAE calls and dropped after, and Qwen-Image latents look like every other image family's.
"""

from __future__ import annotations

import torch
from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline
from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

from raydiff.diffusion.flow_matching import DynamicShift, FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, pack_latents, unpack_latents
from raydiff.pipelines.controlnet import CONTROL_IMAGE
from raydiff.registry import DataKeys


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) from the VAE config, shaped (1, C, 1, 1) to broadcast over `like`."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


# --- units -----------------------------------------------------------------------------------

def _prompt_embedder(p: QwenImagePipeline, inputs: dict) -> dict:
    # The public encode_prompt applies the chat template and drops its 34 system-prompt tokens,
    # exactly as sampling does. Prompts of different lengths come back right-padded with a mask.
    embeds, mask = p.pipe.encode_prompt(prompt=list(inputs["prompt"]), device=p.device,
                                        max_sequence_length=p.max_sequence_length)
    if mask is None:  # diffusers returns None when nothing is padded; keep the outputs uniform
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def encode_image(p: QwenImagePipeline, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) float32 latents, normalised per channel. The control image
    is encoded the same way (QwenImageControlNetPipeline)."""
    vae = p.pipe.vae
    h, w = image.shape[-2:]
    factor = p.vae_scale_factor * 2  # VAE downsampling x 2x2 packing
    if h % factor or w % factor:
        raise ValueError(f"Qwen-Image needs image sides divisible by {factor}; got {h}x{w}")
    clip = image.to(p.device, vae.dtype)[:, :, None]  # one-frame clip
    # The distribution's mode, not a sample: deterministic, so cached and inline latents agree.
    latents = vae.encode(clip).latent_dist.mode()[:, :, 0].float()
    mean, std = latent_stats(vae, latents)
    return (latents - mean) / std  # the inverse of the pipeline's decode-time `x * std + mean`


def _input_image_embedder(p: QwenImagePipeline, inputs: dict) -> dict:
    return {"latents": encode_image(p, inputs["image"])}


# Qwen-Image's original (ComfyUI) module names are diffusers' own.
_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
          "txt_mlp.net.2", "img_mod.1", "txt_mod.1")
_TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2")
ORIGINAL_NAMES = {m: ((m,), None) for m in ["transformer_blocks.{i}." + b for b in _BLOCK] + list(_TOP)}


class QwenImagePipeline(FamilyPipeline):
    family = "qwen_image"
    diffusers_class = DiffusersQwenImagePipeline
    component_names = ("transformer", "vae", "text_encoder", "tokenizer")
    # DiffSynth's training grid; the dynamic shift matches the released scheduler_config.json.
    schedule = FlowSchedule(mu=0.8, shift_terminal=0.02, dynamic=DynamicShift(256, 8192, 0.5, 0.9))
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out"]
    # model.quantize leaves these as loaded: the image/text input projections, the timestep embedder, the
    # blocks' modulation linears (img_mod.1, txt_mod.1), the output norm's and the final projection.
    quantize_skip = ("img_in", "txt_in", "time_text_embed.*", "*_mod.*", "norm_out.*", "proj_out")
    lora_original_names = ORIGINAL_NAMES
    data_keys = DataKeys(("image",), (CONTROL_IMAGE,))
    controlnet_class, controlnet_pipeline_class = QwenImageControlNetModel, QwenImageControlNetPipeline
    controlnet_residuals = {"controlnet_block_samples": "controlnet_block_samples"}
    controlnet_refused = ("extra_condition_channels",)  # the inpainting ControlNet's mask

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",), ("prompt_embeds", "prompt_embeds_mask"),
                         ("text_encoder",)),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, prompt_embeds_mask=None, control_latents=None, **_):
        b, _, h, w = latents.shape
        pred = self.denoise_tokens(pack_latents(latents), sigma, [[(1, h // 2, w // 2)]] * b, prompt_embeds,
                                   prompt_embeds_mask, control_latents=control_latents)
        return unpack_latents(pred, h, w).float()

    def denoise_tokens(self, tokens, sigma, img_shapes, prompt_embeds, prompt_embeds_mask=None,
                       control_latents=None) -> torch.Tensor:
        """The transformer on packed image tokens (B, L, 4C) -> its output (B, L, 4C). `img_shapes`: per sample,
        the (frames, rows, cols) of each image whose tokens `tokens` holds in order, for RoPE (the edit families
        put their sources' tokens after the target's); with `model.controlnet`, after the ControlNet
        (`call_dit`)."""
        dit = self.pipe.transformer
        if prompt_embeds_mask is not None and bool(prompt_embeds_mask.all()):
            # No padding: drop the mask as sampling does, so attention can use the fast unmasked kernels.
            prompt_embeds_mask = None
        return self.call_dit(
            control_latents,
            hidden_states=tokens.to(dit.dtype),
            timestep=sigma.to(dit.dtype),  # the transformer's time projection multiplies by 1000 itself
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            encoder_hidden_states_mask=prompt_embeds_mask,
            img_shapes=img_shapes,
        )

    def encode_control(self, image: torch.Tensor) -> torch.Tensor:
        return encode_image(self, image)

    @classmethod
    def sampling_kwargs(cls, pipe, guidance: float) -> dict:
        if pipe.transformer.config.guidance_embeds:
            return {"guidance_scale": guidance}
        # Qwen-Image's guidance_scale only feeds a distilled embedding; real CFG needs a negative prompt.
        return {"true_cfg_scale": guidance, "negative_prompt": " "} if guidance > 1 else {"true_cfg_scale": 1.0}

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        tokenizer = tiny_qwen_tokenizer()
        pipe = DiffusersQwenImagePipeline(**tiny_components(seed), text_encoder=tiny_qwen_vl(seed + 1, tokenizer),
                                          tokenizer=tokenizer)
        prefix = pipe.prompt_template_encode.split("{}")[0]
        assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx, "template drop misaligned"
        pipe.save_pretrained(path)


# --- tiny parts (Qwen-only, so they live here rather than in tiny_parts) ---------------------

def tiny_components(seed: int) -> dict:
    """The tiny transformer, VAE and scheduler of a Qwen-Image pipeline (the edit families' too)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    # Non-trivial mean/std so tests can tell normalised latents from raw ones.
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, -0.4],
                                 latents_std=[1.5, 0.5, 2.0, 0.8])
    # The released Qwen/Qwen-Image scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# Words of the pipeline's prompt template. Qwen2's pre-tokenizer glues a leading space to a word
# ("Ġthe"); the four words after a newline have none. One token per word makes the system prompt
# 34 tokens, like the real tokenizer, so the pipeline's `prompt_template_encode_start_idx` drops it.
_TEMPLATE_WORDS = ("the image by detailing color shape size texture quantity text spatial relationships of objects "
                   "and background").split()
_LINE_START_WORDS = ("Describe", "assistant", "system", "user")


def tiny_qwen_tokenizer(words=(), line_start_words=()):
    """Byte-level BPE Qwen2Tokenizer: any text tokenizes; template words (and `words`, `line_start_words`: another
    pipeline's template) are single tokens."""
    from raydiff.pipelines import tiny_parts

    return tiny_parts.qwen_tokenizer(_SPECIAL, (*_TEMPLATE_WORDS, *words), (*_LINE_START_WORDS, *line_start_words))


def tiny_qwen_vl(seed: int, tokenizer):
    """A tiny Qwen2.5-VL (docs/tiny_models.md); special-token ids taken from `tokenizer` so the two agree."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(_SPECIAL, tokenizer.convert_tokens_to_ids(_SPECIAL)))
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, intermediate_size=16, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=16, out_hidden_size=16, num_heads=2, intermediate_size=16,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(cfg)
