"""Z-Image (Tongyi-MAI): Qwen3 prompts, FLUX's 16-channel VAE, a single-stream DiT (S3-DiT).

The DiT takes per-sample lists: latents as (C, 1, h, w) clips and prompt embeddings of each prompt's
own length (padding dropped), and patchifies and positions both itself. It is trained as a denoiser
of `x0 - eps` at time `1 - sigma`: `ZImagePipeline` feeds `(1000 - t) / 1000` and negates the output.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline as DiffusersZImagePipeline

from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, scaled_vae_latents

# --- units -----------------------------------------------------------------------------------


def _shape_check(p: ZImagePipeline, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]
    factor = p.vae_scale_factor * 2  # VAE downsampling x the DiT's 2x2 patches
    if h % factor or w % factor:
        raise ValueError(f"Z-Image needs image sides divisible by {factor}; got {h}x{w}")
    return {"height": h, "width": w}


def _prompt_embedder(p: ZImagePipeline, inputs: dict) -> dict:
    # The pipeline's own encoder (chat template, Qwen3's second-to-last hidden layer, padding dropped).
    # It returns one (L_i, D) tensor per prompt; they travel right-padded with a mask, which model_fn
    # undoes. A fresh list: the pipeline writes the templated prompts into the list it is given.
    embeds, _ = p.pipe.encode_prompt(prompt=list(inputs["prompt"]), device=p.device,
                                     do_classifier_free_guidance=False, max_sequence_length=p.max_sequence_length)
    lengths = torch.tensor([len(e) for e in embeds], device=p.device)
    mask = (torch.arange(int(lengths.max()), device=p.device)[None] < lengths[:, None]).long()
    return {"prompt_embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True), "prompt_embeds_mask": mask}


def _input_image_embedder(p: ZImagePipeline, inputs: dict) -> dict:
    return {"latents": scaled_vae_latents(p.pipe.vae, inputs["image"])}


# --- LoRA names (ComfyUI, kohya) --------------------------------------------------------------
# Tongyi released Z-Image in diffusers' layout, and ComfyUI maps LoRA keys in exactly these names
# (`diffusion_model.<name>`) onto its own fused layout: comfy/lora.py `model_lora_keys_unet`, Lumina2
# branch, over comfy/utils.py `z_image_to_diffusers` (tests/pipelines/test_z_image.py transcribes it).
# So the original names are diffusers', limited to the modules that map covers.

_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
          "feed_forward.w2", "feed_forward.w3")
_MODULATED = ("layers.{i}.", "noise_refiner.{i}.")  # context_refiner blocks have no adaLN
_TOP = ("all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1", "cap_embedder.1",
        "t_embedder.mlp.0", "t_embedder.mlp.2")
ORIGINAL_NAMES = {m: ((m,), None) for m in [
    *(b + name for b in (*_MODULATED, "context_refiner.{i}.") for name in _BLOCK),
    *(b + "adaLN_modulation.0" for b in _MODULATED), *_TOP]}


class ZImagePipeline(FamilyPipeline):
    family = "z_image"
    diffusers_class = DiffusersZImagePipeline
    component_names = ("transformer", "vae", "text_encoder", "tokenizer")
    # DiffSynth's Z-Image training grid: linspace(1, 0, 1001)[:-1], static shift 3 (its FlowMatchScheduler
    # "Z-Image" template). The released scheduler_config.json files turn dynamic shifting off (Z-Image-Turbo:
    # shift 3.0, Z-Image: 6.0), so the `calculate_shift` mu ZImagePipeline computes is never used: no dynamic shift.
    schedule = FlowSchedule(shift=3.0)
    # DiffSynth's Z-Image LoRA recipe: attention and the SwiGLU MLP of every block (refiners included).
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
    lora_original_names = ORIGINAL_NAMES
    comfyui_lora_suffixes = ("lora_A", "lora_B")  # what ai-toolkit writes and diffusers' Z-Image loader reads

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("shape_check", _shape_check, ("image",), ("height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",), ("prompt_embeds", "prompt_embeds_mask"),
                         ("text_encoder",)),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, prompt_embeds_mask=None, **_):
        """latents (B, C, h, w), sigma (B,), prompt_embeds (B, L, D) with mask (B, L) -> velocity (B, C, h, w)."""
        dit = self.pipe.transformer
        clips = list(latents.to(dit.dtype).unsqueeze(2).unbind(0))  # (C, 1, h, w) each, as ZImagePipeline
        embeds = prompt_embeds.to(dit.dtype)
        captions = list(embeds.unbind(0)) if prompt_embeds_mask is None else [
            e[m.bool()] for e, m in zip(embeds, prompt_embeds_mask)]
        out = dit(clips, 1 - sigma.float(), captions, return_dict=False)[0]  # the DiT's time runs from noise to data
        return -torch.stack(out).squeeze(2).float()  # it predicts x0 - eps; the flow target is eps - x0

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        from raydiff.pipelines import tiny_parts

        torch.manual_seed(seed)
        # cap_feat_dim = the text encoder's width; head dim 16 = sum(axes_dims).
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        with torch.no_grad():  # the pad tokens are created with torch.empty: give them defined values
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        # The released Z-Image-Turbo scheduler_config.json: static shift 3, no dynamic shifting.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        tokenizer = tiny_parts.qwen3_tokenizer()
        pipe = DiffusersZImagePipeline(
            scheduler=scheduler, vae=tiny_parts.autoencoder_kl(scaling_factor=0.3611), transformer=transformer,
            text_encoder=tiny_parts.qwen3_text_encoder(seed + 1, tokenizer), tokenizer=tokenizer)
        pipe.save_pretrained(path)
