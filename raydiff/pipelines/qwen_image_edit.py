"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (the 2509 / 2511 checkpoints): Qwen-Image trained to edit source images.

Each source goes in twice, as the diffusers pipelines feed it at inference:
- through the Qwen2.5-VL text encoder as vision tokens inside the prompt (`encode_prompt(image=...)`), so the prompt
  embedding depends on the image: an encoder output per sample, not per caption;
- VAE-encoded by the pipeline's `prepare_latents`, its packed latents concatenated after the target's tokens along
  the sequence, with its own `img_shapes` entry; only the target's tokens are the prediction.
Qwen-Image-Edit takes one source, resized by `calculate_dimensions` to ~1024² for both. Edit-Plus takes one to three,
each resized to ~1024² (`VAE_IMAGE_SIZE`) for the VAE and ~384² (`CONDITION_IMAGE_SIZE`) for the vision encoder.
Sources come at their file's size (raydiff.pipelines.edit) and are resized here with the pipeline's own rule and
image processor, as a PIL image passed to the pipeline is; `model.edit_image_pixels` changes the VAE side's area
(training only: the diffusers pipelines, and so sampling, always use their own).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from raydiff.pipelines.base import PipelineUnit, pack_latents, unpack_latents
from raydiff.pipelines.edit import sampling_sources, source_images, source_token_shapes, stack_sources
from raydiff.pipelines.qwen_image import QwenImagePipeline, tiny_components, tiny_qwen_tokenizer, tiny_qwen_vl
from raydiff.registry import EDIT_IMAGE, edit_keys


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, which transformers builds only where torchvision is installed;
    the edit pipelines give it images alone. Loaded from a checkpoint's `processor/` folder (its image processor and
    tokenizer) and handed to the diffusers pipeline in place of the one it would load."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin reads the sub-processors off this signature: without a video_processor, none is needed.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# --- units -----------------------------------------------------------------------------------

def _edit_prompt_embedder(p: QwenImageEditFamily, inputs: dict) -> dict:
    # One encode_prompt per sample, as the pipeline encodes a prompt with its own images (Edit-Plus numbers them,
    # "Picture 1: ..."); embeddings right-padded to the batch's longest with a mask, as for a batch of prompts.
    embeds = []
    for prompt, images in zip(inputs["prompt"], source_images(inputs, p.family, p.max_sources)):
        vision = [p.pipe.image_processor.resize(image, *p.vision_size(image)) for image in images]
        one, _ = p.pipe.encode_prompt(prompt=[prompt], image=vision, device=p.device,
                                      max_sequence_length=p.max_sequence_length)
        embeds.append(one[0])
    longest = max(e.shape[0] for e in embeds)
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        mask[i, :e.shape[0]] = 1
    padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
    return {"prompt_embeds": padded, "prompt_embeds_mask": mask}


def _edit_image_embedder(p: QwenImageEditFamily, inputs: dict) -> dict:
    h, w = inputs["image"].shape[-2:]  # prepare_latents' noise shape, which is not used
    vae, processor = p.pipe.vae, p.pipe.image_processor
    latents, shapes = [], []
    for images in source_images(inputs, p.family, p.max_sources):
        sizes = [p.vae_size(image) for image in images]
        pixels = [processor.preprocess(image, *size).unsqueeze(2) for image, size in zip(images, sizes)]
        # The pipeline's own VAE side: the distribution's mode, normalised, 2x2-packed, sources concatenated.
        # `latents` is handed back untouched: passing it keeps the pipeline from drawing noise.
        _, packed = p.pipe.prepare_latents(pixels if p.source_list else pixels[0], 1, vae.config.z_dim, h, w,
                                           vae.dtype, p.device, None, latents=torch.zeros(0))
        latents.append(packed)
        shapes.append([(sh // p.vae_scale_factor // 2, sw // p.vae_scale_factor // 2) for sh, sw in sizes])
    return stack_sources(latents, shapes)


class QwenImageEditFamily(QwenImagePipeline):
    """Qwen-Image-Edit: one source image per sample. Timestep defaults, LoRA targets and export names are
    Qwen-Image's (the same transformer and scheduler config)."""

    family = "qwen_image_edit"
    diffusers_class = QwenImageEditPipeline
    component_names = (*QwenImagePipeline.component_names, "processor")
    data_keys = edit_keys(1, prompt_reads_source=True)
    controlnet_class = controlnet_pipeline_class = None  # Qwen-Image's ControlNets are trained on `qwen_image`
    max_sources: ClassVar[int] = 1
    source_list: ClassVar[bool] = False  # prepare_latents takes a list of sources (Edit-Plus) or one
    # The source's area for the VAE (written inline in QwenImageEditPipeline.__call__) and for the vision encoder
    # (None: the VAE-sized image itself), with the pipeline module's own calculate_dimensions.
    vae_area: ClassVar[int] = 1024 * 1024
    vision_area: ClassVar[int | None] = None
    dimensions = staticmethod(pipeline_qwenimage_edit.calculate_dimensions)

    def __init__(self, pipe, device, *, edit_image_pixels: int | None = None, **options):
        self.edit_image_pixels = edit_image_pixels or self.vae_area
        super().__init__(pipe, device, **options)

    @classmethod
    def load_diffusers(cls, path: str, **kwargs):
        """The pipeline, its processor loaded image-only (no torchvision needed) unless left out."""
        if "processor" not in kwargs:
            kwargs["processor"] = ImageOnlyQwen2VLProcessor.from_pretrained(path, subfolder="processor",
                                                                            revision=kwargs.get("revision"))
        return super().load_diffusers(path, **kwargs)

    def vae_size(self, image) -> tuple[int, int]:
        """(height, width) the pipeline's rule gives `image` (PIL) for the VAE, at `model.edit_image_pixels`."""
        width, height = self.dimensions(self.edit_image_pixels, image.width / image.height)[:2]
        return height, width

    def vision_size(self, image) -> tuple[int, int]:
        """(height, width) of the image the vision encoder sees (its processor then fits it to its pixel range)."""
        if self.vision_area is None:
            return self.vae_size(image)
        width, height = self.dimensions(self.vision_area, image.width / image.height)[:2]
        return height, width

    def make_units(self) -> list[PipelineUnit]:
        target = next(u for u in super().make_units() if u.name == "input_image_embedder")
        return [
            PipelineUnit("edit_prompt_embedder", _edit_prompt_embedder, ("prompt", EDIT_IMAGE),
                         ("prompt_embeds", "prompt_embeds_mask"), ("text_encoder",)),
            target,
            PipelineUnit("edit_image_embedder", _edit_image_embedder, (EDIT_IMAGE, "image"),
                         ("edit_latents", "edit_shapes"), ("vae",)),
        ]

    def model_fn(self, latents, sigma, *, prompt_embeds, edit_latents, edit_shapes, prompt_embeds_mask=None, **_):
        """latents (B, C, h, w), sigma (B,) -> velocity (B, C, h, w) float32; the sources' tokens `edit_latents`
        follow the target's, each with its own `img_shapes` entry, as the pipeline's denoising loop feeds them."""
        b, _, h, w = latents.shape
        target = pack_latents(latents)
        sources = [(1, rows, cols) for rows, cols in source_token_shapes(edit_shapes)]
        tokens = torch.cat([target, edit_latents.to(target.dtype)], dim=1)
        pred = self.denoise_tokens(tokens, sigma, [[(1, h // 2, w // 2), *sources]] * b, prompt_embeds,
                                   prompt_embeds_mask)
        return unpack_latents(pred[:, :target.shape[1]], h, w).float()

    @classmethod
    def sampling_conditions(cls, conditions: dict) -> dict:
        images = sampling_sources(cls, conditions, cls.max_sources)
        return {"image": images if cls.source_list or images is None else images[0]}

    @classmethod
    def write_tiny(cls, path: str, seed: int = 0) -> None:
        """The tiny Qwen-Image parts, a tokenizer that knows the edit template's words and a Qwen2-VL processor
        (PIL image processor; at most 112² pixels, so a source is at most 16 vision tokens)."""
        write_tiny_edit(cls.diffusers_class, path, seed)


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-Plus (2509 / 2511): one to three source images per sample (`edit_image`: a path or a list)."""

    family = "qwen_image_edit_plus"
    diffusers_class = QwenImageEditPlusPipeline
    data_keys = edit_keys(3, prompt_reads_source=True)
    max_sources = 3
    source_list = True
    vae_area = pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE
    vision_area = pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
    dimensions = staticmethod(pipeline_qwenimage_edit_plus.calculate_dimensions)


# --- tiny model ------------------------------------------------------------------------------

# The edit template's system prompt in single tokens, so `prompt_template_encode_start_idx` (64) drops it exactly.
_EDIT_WORDS = ("key features input ( then explain how user instruction should alter or modify Generate a new that "
               "meets requirements while maintaining consistency with original where appropriate").split()
_EDIT_LINE_START_WORDS = ("color", "),", "'s")


def write_tiny_edit(pipeline_class, path: str, seed: int) -> None:
    """A tiny `pipeline_class` (QwenImageEditPipeline or QwenImageEditPlusPipeline) saved as the real ones are."""
    import json
    import os

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_qwen_tokenizer(_EDIT_WORDS, _EDIT_LINE_START_WORDS)
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}),
        tokenizer=tokenizer)
    pipe = pipeline_class(**tiny_components(seed), text_encoder=tiny_qwen_vl(seed + 1, tokenizer),
                          tokenizer=tokenizer, processor=processor)
    prefix = pipe.prompt_template_encode.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx, "template drop misaligned"
    pipe.save_pretrained(path)
    # Name the processor as the real checkpoints do, so diffusers (with torchvision) loads a Qwen2VLProcessor.
    for name, key, value in (("model_index.json", "processor", ["transformers", "Qwen2VLProcessor"]),
                             ("processor/processor_config.json", "processor_class", "Qwen2VLProcessor")):
        with open(os.path.join(path, name)) as f:
            config = json.load(f)
        config[key] = value
        with open(os.path.join(path, name), "w") as f:
            json.dump(config, f, indent=2)
