"""FLUX.1 Kontext [dev]: FLUX.1 trained to edit a reference image (diffusers' `FluxKontextPipeline`).

The reference is resized as the pipeline resizes it at inference: to the preferred Kontext resolution
(`PREFERRED_KONTEXT_RESOLUTIONS`, ~1 MP) of the closest aspect ratio, with the pipeline's own image processor; then
VAE-encoded and packed by its `prepare_latents`. Its tokens follow the target's along the sequence with their own
RoPE positions (first coordinate 1, the target's 0), and only the target's tokens are the prediction. The reference
comes at its file's size (raydiff.pipelines.edit); `model.edit_image_pixels` scales the preferred resolution to
another area (training and its validation samples; `raydiff sample` uses the pipeline's own rule). Prompts are
text-only, as for FLUX.1.
"""

from __future__ import annotations

import math

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from raydiff.pipelines.base import PipelineUnit, pack_latents, unpack_latents
from raydiff.pipelines.edit import sampling_sources, source_images, source_token_shapes, stack_sources
from raydiff.pipelines.flux import FluxImagePipeline, latent_image_ids, tiny_components
from raydiff.registry import EDIT_IMAGE, edit_keys


def _reference_embedder(p: FluxKontextFamily, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]  # prepare_latents' noise shape, which is not used
    vae, processor = p.pipe.vae, p.pipe.image_processor
    latents, shapes = [], []
    for (image,) in source_images(inputs, p.family, 1):
        rh, rw = p.reference_size(image)
        pixels = processor.preprocess(processor.resize(image, rh, rw), rh, rw)
        # The pipeline's own VAE side: the mode, shifted and scaled, 2x2-packed. `latents` is handed back untouched:
        # passing it keeps the pipeline from drawing noise.
        _, packed, _, _ = p.pipe.prepare_latents(pixels, 1, vae.config.latent_channels, h, w, vae.dtype, p.device,
                                                 None, latents=torch.zeros(0))
        latents.append(packed)
        shapes.append([(rh // p.vae_scale_factor // 2, rw // p.vae_scale_factor // 2)])
    return stack_sources(latents, shapes)


class FluxKontextFamily(FluxImagePipeline):
    """FLUX.1 Kontext: one reference image per sample. Timestep defaults (FLUX.1-dev's scheduler: shift 3, dynamic
    0.5-1.15), LoRA targets, export names and the guidance embedding (`model.guidance`) are FLUX.1's."""

    family = "flux_kontext"
    diffusers_class = FluxKontextPipeline
    component_names = (*FluxImagePipeline.component_names, "image_encoder", "feature_extractor")
    data_keys = edit_keys(1)
    controlnet_class = controlnet_pipeline_class = None  # FLUX's ControlNets are trained on `flux`

    def __init__(self, pipe, device, *, edit_image_pixels: int | None = None, **options):
        self.edit_image_pixels = edit_image_pixels  # None: the preferred resolutions themselves
        super().__init__(pipe, device, **options)

    def reference_size(self, image) -> tuple[int, int]:
        """(height, width) of the reference (PIL) as FluxKontextPipeline's auto-resize picks it: the preferred
        resolution of the closest aspect ratio (scaled to `model.edit_image_pixels`), floored to a multiple of
        16 (VAE x 2x2 packing)."""
        multiple = self.vae_scale_factor * 2
        height, width = self.pipe.image_processor.get_default_height_width(image)
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        if self.edit_image_pixels is not None:
            scale = math.sqrt(self.edit_image_pixels / (width * height))
            width, height = round(width * scale), round(height * scale)
        return max(height // multiple, 1) * multiple, max(width // multiple, 1) * multiple

    def make_units(self) -> list[PipelineUnit]:
        units = super().make_units()  # shape check, prompt, the target's latents, guidance
        reference = PipelineUnit("reference_embedder", _reference_embedder, (EDIT_IMAGE, "image"),
                                 ("edit_latents", "edit_shapes"), ("vae",))
        return [*units[:-1], reference, units[-1]]

    def model_fn(self, latents, sigma, *, prompt_embeds, pooled_prompt_embeds, text_ids, edit_latents, edit_shapes,
                 guidance=None, **_):
        """latents (B, C, h, w), sigma (B,) -> velocity (B, C, h, w) float32; the reference's tokens follow the
        target's with first RoPE coordinate 1, as FluxKontextPipeline's denoising loop feeds them."""
        h, w = latents.shape[-2:]
        dtype = self.pipe.transformer.dtype
        (rows, cols), = source_token_shapes(edit_shapes)
        reference_ids = latent_image_ids(rows * 2, cols * 2, latents.device, dtype)
        reference_ids[:, 0] = 1
        ids = torch.cat([latent_image_ids(h, w, latents.device, dtype), reference_ids])
        target = pack_latents(latents)
        tokens = torch.cat([target, edit_latents.to(target.dtype)], dim=1)
        pred = self.denoise_tokens(tokens, sigma, ids, prompt_embeds=prompt_embeds,
                                   pooled_prompt_embeds=pooled_prompt_embeds, text_ids=text_ids, guidance=guidance)
        return unpack_latents(pred[:, :target.shape[1]], h, w).float()

    @classmethod
    def sampling_conditions(cls, conditions: dict) -> dict:
        images = sampling_sources(cls, conditions, 1)
        return {"image": None if images is None else images[0]}

    def validation_conditions(self, conditions: dict) -> dict:
        """With `model.edit_image_pixels`, the reference at the size training gave it (`_auto_resize` off): a
        model trained on small references is judged on them, and a tiny model's validation is not a ~1 MP
        reference (minutes on CPU)."""
        kwargs = self.sampling_conditions(conditions)
        if self.edit_image_pixels is None or kwargs["image"] is None:
            return kwargs
        image = kwargs["image"]
        return {"image": self.pipe.image_processor.resize(image, *self.reference_size(image)), "_auto_resize": False}

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        """The tiny FLUX.1 parts (a guidance-distilled transformer, as Kontext [dev]) as a FluxKontextPipeline."""
        FluxKontextPipeline(**tiny_components(seed)).save_pretrained(path)
