"""Wan VACE (diffusers' `WanVACEPipeline`): video generation guided by a control video, a mask of what to
regenerate and reference images, through VACE blocks that run beside the DiT's and add hints to its hidden
states ("cross-computation with the denoising model", in DiffSynth's words).

Conditions are WanVACEPipeline's: its own `prepare_video_latents` splits the control video by the mask into
inactive and reactive parts, VAE-encodes each and puts the reference images' latents in front as extra
frames; the mask is folded 8x8 into channels as its `prepare_masks` does (written out here: that method reads
the DiT's config, and encoders run without the DiT). As in DiffSynth's VACE training,
the clean latents get the references' latents in front too, so the denoised sequence lines up with the
control (the pipeline drops those frames before decoding). Without a control video the pipeline's defaults
apply (zeros, everything to generate). LoRA: the default targets train the DiT's and the VACE blocks'
attention and MLP; `lora.target_modules: [vace_blocks.*.to_q, ...]` trains the VACE blocks alone.
"""

from __future__ import annotations

import torch
from diffusers import WanVACEPipeline

from raydiff.pipelines.base import FamilyPipeline, PipelineUnit
from raydiff.pipelines.wan import (
    ORIGINAL_NAMES,
    PROMPT_EMBEDDER,
    SHAPE_CHECK,
    VIDEO_OR_IMAGE,
    WAN_LORA_TARGETS,
    WAN_SCHEDULE,
    block_names,
    encode_video,
    tiny_components,
    video_input,
    video_seq_len,
)
from raydiff.registry import DataKeys

CONDITIONS = ("control_video", "mask_video", "reference_images")
# ComfyUI's VaceWanAttentionBlock (comfy/ldm/wan/model.py): a Wan block plus before_proj (the first only) and
# after_proj, diffusers' proj_in / proj_out.
VACE_ORIGINAL_NAMES = {
    **ORIGINAL_NAMES,
    **block_names("vace_blocks", "vace_blocks"),
    "vace_blocks.{i}.before_proj": (("vace_blocks.{i}.proj_in",), None),
    "vace_blocks.{i}.after_proj": (("vace_blocks.{i}.proj_out",), None),
}


def fold_mask(mask: torch.Tensor, refs: int, spatial: int, temporal: int) -> torch.Tensor:
    """(3, F, H, W) mask in [0, 1] -> (spatial², refs + f, h, w): WanVACEPipeline.prepare_masks for one video,
    each 8x8 pixel block folded into channels, time subsampled to the latent frames, zeros for the references.
    Written out because the pipeline's reads the DiT's patch size, and an encoder runs without the DiT."""
    f, h, w = mask.shape[1:]
    folded = mask[0].view(f, h // spatial, spatial, w // spatial, spatial).permute(2, 4, 0, 1, 3).flatten(0, 1)
    size = ((f + temporal - 1) // temporal, h // spatial, w // spatial)
    folded = torch.nn.functional.interpolate(folded[None], size=size, mode="nearest-exact")[0]
    return torch.cat([folded.new_zeros(folded.shape[0], refs, *size[1:]), folded], dim=1)


def _sample_conditions(inputs: dict, i: int, target: torch.Tensor) -> tuple:
    """Sample i's (control video, mask, reference images) as WanVACEPipeline.preprocess_conditions makes them:
    video (1, 3, F, H, W) in [-1, 1] (zeros without one), mask (1, 3, F, H, W) in [0, 1] (ones: all generated),
    a list of (3, H, W) references (the decode stage sized them to the video, so each fills its canvas)."""
    got = {k: inputs[k][i].float() for k in CONDITIONS if inputs.get(k) is not None}
    for key in ("control_video", "mask_video", "reference_images"):
        frames = key == "reference_images"
        if key in got and got[key].shape[-3 + frames:] != target.shape[-3 + frames:]:
            raise ValueError(f"{key} is {tuple(got[key].shape[1:])} (frames, height, width), the video "
                             f"{tuple(target.shape[1:])}; they must match")
    video = got.get("control_video", torch.zeros_like(target))[None]
    mask = ((got["mask_video"] + 1) / 2).clamp(0, 1)[None] if "mask_video" in got else torch.ones_like(video)
    references = list(got["reference_images"].unbind(1)) if "reference_images" in got else []
    return video, mask, references


# --- units -----------------------------------------------------------------------------------

def _vace_embedder(p: WanVACEFamily, inputs: dict) -> dict:
    """latents: the target's, after the reference images' (B, z, refs + f, h, w); control_hidden_states:
    (B, 2z + 64, refs + f, h, w), the VACE blocks' input."""
    target = video_input(inputs)
    latents, controls = encode_video(p, target), []
    for i in range(target.shape[0]):  # the pipeline prepares one video at a time
        video, mask, references = _sample_conditions(inputs, i, target[i])
        video, mask = video.to(p.device), mask.to(p.device)
        references = [r.to(p.device) for r in references]
        # The pipeline's own VAE side: inactive and reactive parts of the control, the references in front.
        control = p.pipe.prepare_video_latents(video, mask, [references], None, p.device).float()
        folded = fold_mask(mask[0], len(references), p.pipe.vae_scale_factor_spatial, p.pipe.vae_scale_factor_temporal)
        controls.append(torch.cat([control, folded[None].to(control)], dim=1))
    control = torch.cat(controls)
    refs, z = control.shape[2] - latents.shape[2], latents.shape[1]
    # The references' latents (the control's inactive half of those frames) lead the clean latents.
    return {"latents": torch.cat([control[:, :z, :refs], latents], dim=2), "control_hidden_states": control}


class WanVACEFamily(FamilyPipeline):
    family = "wan_vace"
    diffusers_class = WanVACEPipeline
    component_names = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer")
    schedule = WAN_SCHEDULE
    default_lora_targets = WAN_LORA_TARGETS  # matches the DiT's blocks and the VACE blocks alike
    data_keys = DataKeys(VIDEO_OR_IMAGE, CONDITIONS, (("mask_video", "control_video"),))
    tiny_variants = ("wan21",)
    lora_original_names = VACE_ORIGINAL_NAMES
    diffsynth_lora_format = "original"  # DiffSynth\'s WanModel keeps the official names

    def make_units(self) -> list[PipelineUnit]:
        return [
            SHAPE_CHECK,
            PROMPT_EMBEDDER,
            PipelineUnit("vace_embedder", _vace_embedder, (VIDEO_OR_IMAGE,), ("latents", "control_hidden_states"),
                         ("vae",)),
        ]

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return video_seq_len(self.dit, latents)

    def model_fn(self, latents, sigma, *, prompt_embeds, control_hidden_states, **_):
        """latents (B, z, refs + f, h, w), sigma (B,) -> velocity of the same shape, float32."""
        dit = self.dit
        pred = dit(
            hidden_states=latents.to(dit.dtype),
            timestep=sigma.float() * 1000,
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            control_hidden_states=control_hidden_states.to(dit.dtype),
            # One scale per VACE layer, 1.0 as the pipeline's default conditioning_scale.
            control_hidden_states_scale=torch.ones(len(dit.config.vace_layers), device=latents.device,
                                                   dtype=dit.dtype),
            return_dict=False,
        )[0]
        return pred.float()

    @classmethod
    def sampling_conditions(cls, conditions: dict) -> dict:
        unknown = set(conditions) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"{cls.family} takes {', '.join(CONDITIONS)}; got {sorted(unknown)}")
        if "mask_video" in conditions and "control_video" not in conditions:
            raise ValueError("a mask video needs a control video")
        names = {"control_video": "video", "mask_video": "mask", "reference_images": "reference_images"}
        return {names[k]: v for k, v in conditions.items()}

    @staticmethod
    def write_tiny(path: str, seed: int = 0, variant: str | None = None) -> None:
        """Wan 2.1 VACE in miniature: the tiny Wan 2.1 parts with a VACE DiT (VACE blocks beside both blocks;
        96 control channels = 2 x 16 latent + 8 x 8 mask)."""
        from diffusers import WanVACETransformer3DModel

        if (variant or "wan21") != "wan21":
            raise ValueError(f"the tiny wan_vace variants are {WanVACEFamily.tiny_variants}")
        parts = tiny_components(seed, "wan21")
        torch.manual_seed(seed)
        parts["transformer"] = WanVACETransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=96)
        WanVACEPipeline(**parts).save_pretrained(path)
