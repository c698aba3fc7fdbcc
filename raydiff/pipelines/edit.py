"""What the edit families (Qwen-Image-Edit, Qwen-Image-Edit-Plus, FLUX.1 Kontext) share: their source images and
the packed source latents they concatenate after the target's tokens.

A source (`edit_image`) reaches a unit at the size of its file: the decode stage leaves it alone
(raydiff.data.decode.NATIVE_KEYS), because each pipeline resizes its source by its own rule at inference, and
the family's unit applies that rule with the pipeline's own image processor. Per sample a unit gets a list of
sources; their packed latents travel as `edit_latents` (B, L, 4C), every source's tokens in order, and
`edit_shapes` (B, N, 2), the (rows, cols) of tokens of each, which model_fn turns into RoPE positions.
"""

from __future__ import annotations

import torch
from PIL import Image

from raydiff.pipelines.base import to_pil
from raydiff.registry import EDIT_IMAGE


def source_images(inputs: dict, family: str, max_sources: int) -> list[list[Image.Image]]:
    """Per sample, its source images as PIL (the pixels the decode stage read). `edit_image` as collate makes it:
    (B, 3, N, H, W) in [-1, 1], or per sample a (3, N, H, W) (a batch of mixed sizes); a (3, H, W) or a list
    of them stands for one sample's sources too (B, 3, H, W: one source each)."""
    sources = inputs[EDIT_IMAGE]
    out = []
    for one in (sources.unbind(0) if torch.is_tensor(sources) else sources):
        images = list(one) if not torch.is_tensor(one) else [one] if one.ndim == 3 else list(one.unbind(1))
        if not 1 <= len(images) <= max_sources:
            most = "one source image" if max_sources == 1 else f"1 to {max_sources} source images"
            raise ValueError(f"{family} takes {most} per sample; got {len(images)}")
        out.append([to_pil(image[None])[0] for image in images])
    return out


def stack_sources(latents: list[torch.Tensor], shapes: list[list[tuple[int, int]]]) -> dict:
    """Per sample (1, L, 4C) packed source latents and their token (rows, cols) -> the batch's `edit_latents`
    (B, L, 4C) float32 and `edit_shapes` (B, N, 2) long. Sources of one batch must resize alike."""
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"the edit sources of one batch resize to different token grids {shapes}; use "
                         f"train.batch_size 1, or sources of one aspect ratio per batch (data.buckets)")
    return {"edit_latents": torch.cat(latents).float(),
            "edit_shapes": torch.tensor(shapes, dtype=torch.long, device=latents[0].device)}


def source_token_shapes(edit_shapes: torch.Tensor) -> list[tuple[int, int]]:
    """`edit_shapes` (B, N, 2) -> the N sources' (rows, cols) of tokens, the same for every sample (a stream or
    cache batch may mix samples encoded apart; the denoiser takes one layout per batch)."""
    if bool((edit_shapes != edit_shapes[:1]).any()):
        raise ValueError(f"a batch mixes edit sources of different sizes {edit_shapes.tolist()}; use "
                         f"train.batch_size 1, or sources of one aspect ratio per batch (data.buckets)")
    return [(int(r), int(c)) for r, c in edit_shapes[0].tolist()]


def sampling_sources(family_cls, conditions: dict, max_sources: int) -> list | None:
    """`raydiff sample --image` / `validation.images` -> the source images a sampling call takes (None for a
    names-only check). Edit families sample from their sources alone."""
    if set(conditions) != {EDIT_IMAGE}:
        raise ValueError(f"{family_cls.family} samples from its source image (--image, repeatable up to "
                         f"{max_sources}); got {sorted(conditions) or 'none'}")
    images = conditions[EDIT_IMAGE]
    if images is None:
        return None
    images = images if isinstance(images, list) else [images]
    if not 1 <= len(images) <= max_sources:
        raise ValueError(f"{family_cls.family} takes at most {max_sources} source image(s); got {len(images)}")
    return images
