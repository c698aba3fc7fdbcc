"""FLUX.2 [klein]: Qwen3 prompts (three hidden layers stacked), the FLUX.2 VAE, an MMDiT on 2x2-patchified latents.

FLUX.2's latent space is the VAE's output patchified 2x2 (4x the channels, half the sides) and then
standardised per channel by the VAE's batch-norm statistics: that is where `Flux2KleinPipeline` draws its
noise, so raydiff's latents are those (B, 4C, H/16, W/16) grids and every grid cell is one DiT token.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline

from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, pack_latents
from raydiff.pipelines.flux import DOUBLE_ATTENTION_NAMES


def patchified_latents(vae, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> float32 (B, 4C, H/2f, W/2f): the VAE's mode, 2x2 patches as channels
    (channel 4c + 2dy + dx), standardised by the VAE's batch-norm running statistics; the inverse of what
    `Flux2KleinPipeline` does before decoding (`x * sqrt(var + eps) + mean`, then unpatchify). The mode, not a
    sample: deterministic, so cached and inline latents agree."""
    latents = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode().float()
    b, c, h, w = latents.shape
    grid = pack_latents(latents).transpose(1, 2).reshape(b, c * 4, h // 2, w // 2)
    mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (grid - mean) / std


def position_ids(h: int, w: int, text_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE coordinates (t, h, w, l): image tokens (0, row, col, 0) in row-major order (h*w, 4), text
    tokens (0, 0, 0, i) (text_len, 4); the same for every sample."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    img = torch.zeros(h * w, 4, dtype=torch.long, device=device)
    img[:, 1], img[:, 2] = rows.reshape(-1), cols.reshape(-1)
    txt = torch.zeros(text_len, 4, dtype=torch.long, device=device)
    txt[:, 3] = torch.arange(text_len, device=device)
    return img, txt


# --- units -----------------------------------------------------------------------------------


def _shape_check(p: Flux2KleinImagePipeline, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]
    factor = p.vae_scale_factor * 2  # VAE downsampling x the 2x2 patchify
    if h % factor or w % factor:
        raise ValueError(f"FLUX.2 needs image sides divisible by {factor}; got {h}x{w}")
    return {"height": h, "width": w}


def _prompt_embedder(p: Flux2KleinImagePipeline, inputs: dict) -> dict:
    # The pipeline's own encoder: chat template without thinking, padded to max_sequence_length (the DiT
    # attends to padding too: there is no text mask), hidden layers (9, 18, 27) stacked along features.
    # Its text ids are (0, 0, 0, i) for every sample; model_fn rebuilds them.
    embeds, _ = p.pipe.encode_prompt(prompt=list(inputs["prompt"]), device=p.device,
                                     max_sequence_length=p.max_sequence_length)
    return {"prompt_embeds": embeds}


def _input_image_embedder(p: Flux2KleinImagePipeline, inputs: dict) -> dict:
    return {"latents": patchified_latents(p.pipe.vae, inputs["image"])}


# --- LoRA names in BFL's original checkpoints (ComfyUI, kohya) ----------------------------------
# As FLUX.1's, with FLUX.2's SwiGLU MLPs (img_mlp.0 is linear_in, gate and value stacked), its single
# blocks' fused input (linear1 = to_qkv_mlp_proj) and output (linear2 = to_out), and modulations shared
# by all blocks. The names diffusers' own FLUX.2 converters use (loaders/lora_conversion_utils.py) and
# ComfyUI's FLUX.2 model has (comfy/ldm/flux); its final adaLN is left out (halves stored in the other order).

_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
ORIGINAL_NAMES = {
    **DOUBLE_ATTENTION_NAMES,
    "double_blocks.{i}.img_mlp.0": ((_D + "ff.linear_in",), None),
    "double_blocks.{i}.img_mlp.2": ((_D + "ff.linear_out",), None),
    "double_blocks.{i}.txt_mlp.0": ((_D + "ff_context.linear_in",), None),
    "double_blocks.{i}.txt_mlp.2": ((_D + "ff_context.linear_out",), None),
    "single_blocks.{i}.linear1": ((_S + "attn.to_qkv_mlp_proj",), None),
    "single_blocks.{i}.linear2": ((_S + "attn.to_out",), None),
    "double_stream_modulation_img.lin": (("double_stream_modulation_img.linear",), None),
    "double_stream_modulation_txt.lin": (("double_stream_modulation_txt.linear",), None),
    "single_stream_modulation.lin": (("single_stream_modulation.linear",), None),
    "img_in": (("x_embedder",), None),
    "txt_in": (("context_embedder",), None),
    "time_in.in_layer": (("time_guidance_embed.timestep_embedder.linear_1",), None),
    "time_in.out_layer": (("time_guidance_embed.timestep_embedder.linear_2",), None),
    "final_layer.linear": (("proj_out",), None),
}


class Flux2KleinImagePipeline(FamilyPipeline):
    family = "flux2_klein"
    diffusers_class = Flux2KleinPipeline
    component_names = ("transformer", "vae", "text_encoder", "tokenizer")
    # DiffSynth's FLUX.2 training grid: linspace(1, 1/1000, 1000) with the exponential shift mu = 0.8 (its
    # FlowMatchScheduler "FLUX.2" template). No resolution-dependent shift: Flux2KleinPipeline's mu is
    # `compute_empirical_mu(image_seq_len, num_inference_steps)`, a fit to the number of sampling steps
    # that has no training counterpart (extrapolated to 1000 steps it turns negative).
    schedule = FlowSchedule(mu=0.8, sigma_min=1 / 1000)
    # DiffSynth's FLUX.2 [klein] LoRA recipe, less the single blocks' output projection: `attn.to_out` there
    # cannot be named by suffix without also naming the double blocks' `to_out` ModuleList, so DiffSynth lists
    # `single_transformer_blocks.N.attn.to_out` one by one; add those to lora.target_modules to train them.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj"]
    lora_original_names = ORIGINAL_NAMES
    # diffusers' FLUX.2 loader reads `diffusion_model.` keys as lora_A/lora_B and refuses alpha keys there;
    # ComfyUI reads a missing alpha as scale 1 (comfy/weight_adapter/lora.py). So the ComfyUI file carries
    # alpha / r inside lora_B.
    comfyui_lora_suffixes = ("lora_A", "lora_B")
    comfyui_lora_alpha = False
    patch_size = 1  # latents are already 2x2-patchified: one token per grid cell

    def make_units(self) -> list[PipelineUnit]:
        return [
            PipelineUnit("shape_check", _shape_check, ("image",), ("height", "width")),
            PipelineUnit("prompt_embedder", _prompt_embedder, ("prompt",), ("prompt_embeds",), ("text_encoder",)),
            PipelineUnit("input_image_embedder", _input_image_embedder, ("image",), ("latents",), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, **_):
        """latents (B, 4C, h, w), sigma (B,), prompt_embeds (B, L, D) -> velocity (B, 4C, h, w) float32."""
        dit = self.pipe.transformer
        b, c, h, w = latents.shape
        img_ids, txt_ids = position_ids(h, w, prompt_embeds.shape[1], latents.device)
        pred = dit(
            hidden_states=latents.reshape(b, c, h * w).transpose(1, 2).to(dit.dtype),  # (B, h*w, 4C) tokens
            timestep=sigma.to(dit.dtype),  # the transformer multiplies by 1000 itself
            guidance=None,  # [klein] has no guidance embedding
            encoder_hidden_states=prompt_embeds.to(dit.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return pred.transpose(1, 2).reshape(b, c, h, w).float()

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        from raydiff.pipelines import tiny_parts

        torch.manual_seed(seed)
        # 4 latent channels patchified 2x2 = 16 DiT input channels; head dim 16 = sum(axes_dims_rope);
        # joint_attention_dim = 3 stacked text-encoder layers x width 16.
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
            axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False, sample_size=32)
        with torch.no_grad():  # non-trivial batch-norm statistics, so tests can tell normalised latents from raw
            vae.bn.running_mean.normal_(0, 0.5)
            vae.bn.running_var.uniform_(0.25, 4.0)
        # Dynamic shifting on: the pipeline passes compute_empirical_mu's mu to set_timesteps.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        tokenizer = tiny_parts.qwen3_tokenizer()
        # 28 layers (of width 16): the pipeline stacks hidden states 9, 18 and 27, as of the real Qwen3.
        text_encoder = tiny_parts.qwen3_text_encoder(seed + 1, tokenizer, causal_lm=True, layers=28)
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=text_encoder,
                                  tokenizer=tokenizer)
        pipe.save_pretrained(path)
