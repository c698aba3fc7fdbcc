"""Wan image-to-video (diffusers' `WanImageToVideoPipeline`): Wan 2.1 I2V, Wan 2.2 I2V-A14B (two experts) and
Wan 2.2 TI2V-5B's image-to-video mode.

The condition is the clip's first frame, or an `image` column of the clip's size. Wan 2.1 / 2.2 A14B take it
as extra input channels: a 4-channel mask (first frame known) and the VAE latents of [image, zeros...],
concatenated to the noisy latents; Wan 2.1 also cross-attends to its CLIP image features. TI2V-5B
(`expand_timesteps`) instead puts the image's clean latents in the first latent frame, whose tokens get
timestep 0, and the loss leaves that frame out (as DiffSynth's TI2V training does). Conditions are
prepared by the pipeline's own `prepare_latents` and `encode_image`.
"""

from __future__ import annotations

import torch
from diffusers import WanImageToVideoPipeline

from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, to_pil
from raydiff.pipelines.wan import (
    ORIGINAL_NAMES,
    PROMPT_EMBEDDER,
    SHAPE_CHECK,
    TINY_VARIANTS,
    WAN_LORA_TARGETS,
    WAN_SCHEDULE,
    encode_video,
    tiny_components,
    token_timesteps,
    video_seq_len,
)
from raydiff.registry import DataKeys


def condition_image(inputs: dict) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: the `image` column, else the video's first frame."""
    video, image = inputs["video"], inputs.get("image")
    if image is None:
        return video[:, :, 0]
    if image.shape[-2:] != video.shape[-2:]:
        raise ValueError(f"the condition image is {tuple(image.shape[-2:])}, the video {tuple(video.shape[-2:])}")
    return image


# --- units -----------------------------------------------------------------------------------

def _image_embedder(p: WanImageToVideoFamily, inputs: dict) -> dict:
    # Only Wan 2.1 I2V ships a CLIP image encoder (Wan 2.2 checkpoints have none); as the pipeline does, its
    # penultimate hidden states, from the PIL image the user would pass.
    if p.pipe.image_encoder is None:
        return {"image_embeds": None}
    return {"image_embeds": p.pipe.encode_image(to_pil(condition_image(inputs)), p.device)}


def _image_condition(p: WanImageToVideoFamily, inputs: dict) -> dict:
    video, image = inputs["video"], condition_image(inputs).float()
    _, _, f, h, w = video.shape
    z = p.pipe.vae.config.z_dim
    conditions = []
    for one in image.split(1):  # prepare_latents conditions a batch on one image
        # `latents` is handed back untouched: passing it keeps the pipeline from drawing from the global RNG.
        out = p.pipe.prepare_latents(one.to(p.device), 1, z, h, w, f, torch.float32, p.device, None,
                                     latents=torch.zeros(0))
        conditions.append(out[1])
    condition = torch.cat(conditions)
    if not p.pipe.config.get("expand_timesteps"):
        return {"condition": condition, "loss_mask": None}  # (B, 4 + z, f, h, w): mask channels, then latents
    # TI2V: (B, z, 1, h, w), the first latent frame; it is given clean, so it is not a prediction to train.
    loss_mask = torch.ones(condition.shape[0], 1, (f - 1) // p.pipe.vae_scale_factor_temporal + 1, 1, 1,
                           device=condition.device)
    loss_mask[:, :, 0] = 0
    return {"condition": condition, "loss_mask": loss_mask}


def _input_video_embedder(p: WanImageToVideoFamily, inputs: dict) -> dict:
    return {"latents": encode_video(p, inputs["video"])}


class WanImageToVideoFamily(FamilyPipeline):
    family = "wan_i2v"
    diffusers_class = WanImageToVideoPipeline
    component_names = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "image_encoder",
                       "image_processor")
    schedule = WAN_SCHEDULE
    # Also Wan 2.1's image cross-attention (attn2.add_k_proj / add_v_proj; absent from Wan 2.2's DiTs): a LoRA
    # without them is one diffusers takes for text-to-video and pads with zero adapters, which peft warns about.
    default_lora_targets = [*WAN_LORA_TARGETS, "add_k_proj", "add_v_proj"]
    data_keys = DataKeys(("video",), ("image",), sampling=("image",))
    tiny_variants = TINY_VARIANTS
    lora_original_names = ORIGINAL_NAMES
    diffsynth_lora_format = "original"  # DiffSynth\'s WanModel keeps the official names

    def make_units(self) -> list[PipelineUnit]:
        return [
            SHAPE_CHECK,
            PROMPT_EMBEDDER,
            PipelineUnit("input_video_embedder", _input_video_embedder, ("video",), ("latents",), ("vae",)),
            PipelineUnit("image_embedder", _image_embedder, ("video",), ("image_embeds",), ("image_encoder",)),
            PipelineUnit("image_condition", _image_condition, ("video",), ("condition", "loss_mask"), ("vae",)),
        ]

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return video_seq_len(self.dit, latents)

    def model_fn(self, latents, sigma, *, prompt_embeds, condition, image_embeds=None, **_):
        """latents (B, z, f, h, w), sigma (B,) -> velocity (B, z, f, h, w) float32; `condition` as
        `_image_condition` makes it, fed as WanImageToVideoPipeline's denoising loop feeds it."""
        dit = self.dit
        timestep = sigma.float() * 1000
        if self.pipe.config.get("expand_timesteps"):
            # (1 - mask) * condition + mask * latents with the first frame's mask 0, and its tokens at t = 0.
            hidden = torch.cat([condition.to(latents.dtype), latents[:, :, 1:]], dim=2)
            timestep = token_timesteps(timestep, latents, dit.config.patch_size, clean_first_frame=True)
        else:
            hidden = torch.cat([latents, condition.to(latents.dtype)], dim=1)
        pred = dit(
            hidden_states=hidden.to(dit.dtype),
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(dit.dtype),
            return_dict=False,
        )[0]
        return pred.float()

    @classmethod
    def sampling_conditions(cls, conditions: dict) -> dict:
        if "image" not in conditions or set(conditions) != {"image"}:
            raise ValueError(f"{cls.family} samples from an image (--image); got {sorted(conditions) or 'none'}")
        return {"image": conditions["image"]}

    @staticmethod
    def write_tiny(path: str, seed: int = 0, variant: str | None = None) -> None:
        """`variant`: wan21 (default: Wan 2.1 I2V with a CLIP image encoder), wan22_a14b (two experts, boundary
        0.9, no CLIP) or wan22_ti2v_5b (written as the real one is: a WanPipeline with `expand_timesteps`)."""
        from diffusers import WanPipeline

        variant = variant or "wan21"
        if variant == "wan22_ti2v_5b":
            WanPipeline(**tiny_components(seed, variant), expand_timesteps=True).save_pretrained(path)
            return
        clip = variant == "wan21"
        extra = dict(image_dim=32, added_kv_proj_dim=24) if clip else {}
        parts = tiny_components(seed, variant, in_channels=36, **extra)  # 16 noisy + 4 mask + 16 condition
        if clip:
            parts.update(image_encoder=tiny_clip_vision(seed + 3), image_processor=tiny_clip_processor())
        config = {} if clip else dict(boundary_ratio=0.9)
        WanImageToVideoPipeline(**parts, **config).save_pretrained(path)


def tiny_clip_vision(seed: int):
    """A tiny CLIPVisionModel (32 px, 8 px patches: 17 tokens); Wan 2.1 I2V uses its penultimate layer."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=3, image_size=32, patch_size=8))


def tiny_clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
