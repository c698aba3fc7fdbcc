"""Validation samples: a few fixed prompts rendered by the family's own diffusers pipeline, next to
the base model's images, so a checkpoint shows what its LoRA does.

Sampling goes through `training_pipe.pipe` (the diffusers pipeline holding the trainable
transformer), so it sees the current LoRA weights directly and runs the inference code a user will
run. Seeds are per prompt index (`settings.seed + i`) on a CPU generator: the same prompt gets the
same starting noise on every checkpoint and every machine, and only the weights change the image.
"""

from __future__ import annotations

import gc
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class ValidationSettings:
    """What to sample; mirrors the `validation:` config section.

    `guidance` is the family pipeline's guidance strength (the family's `sampling_kwargs`): FLUX.1-dev's
    distilled guidance embedding, classifier-free guidance for SD3 and Wan (doubles the batch), and for
    Qwen-Image true CFG with an empty negative prompt (or the distilled embedding if the model has one).
    `num_frames` is for video families (4k + 1); only the first frame is kept. `images`: per prompt, the
    condition images an edit family samples from, or a ControlNet's control image (`validation.images`, loaded
    by `condition_images`), for the data key `condition_key` (None: the family's first sampling key).
    """

    prompts: list[str]
    seed: int = 0
    steps: int = 20
    guidance: float = 3.5
    height: int = 512
    width: int = 512
    num_frames: int = 1
    images: tuple[list[Image.Image], ...] = ()
    condition_key: str | None = None


def condition_images(paths: list[str | list[str]]) -> tuple[list[Image.Image], ...]:
    """`validation.images` -> per prompt, its images (RGB)."""
    return tuple([Image.open(p).convert("RGB") for p in ([one] if isinstance(one, str) else one)] for one in paths)


# Components a call may lack (IP-Adapter parts, a one-expert Wan's second expert, a CLIP-less Wan I2V's
# image encoder and processor).
_OPTIONAL = {"image_encoder", "feature_extractor", "transformer_2", "image_processor"}


def sample_images(family, diffusers_pipe, settings: ValidationSettings, *, device=None,
                  max_sequence_length: int | None = None, call_kwargs: dict | None = None,
                  conditions=None) -> list[Image.Image]:
    """One image per prompt at batch 1 from `diffusers_pipe` (of the family class `family`), generator
    seeded with `settings.seed + i` on `device` (None = CPU, so images do not depend on the accelerator).
    Video pipelines give their first frame.
    `max_sequence_length`: text tokens (None = the pipeline's default); pass the training value so
    prompts are encoded as in training. `call_kwargs`: condition inputs of the call (the family's
    `sampling_conditions`: an image to animate, a control video). `conditions`: what turns a prompt's
    `settings.images` into such inputs (default `family.sampling_conditions`; training's validation passes
    the family's `validation_conditions`)."""
    missing = [name for name, c in diffusers_pipe.components.items() if c is None and name not in _OPTIONAL]
    if missing:
        raise ValueError(f"sampling needs every component; this pipeline was loaded without {missing}")
    diffusers_pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(diffusers_pipe.__call__).parameters
    extra = {"num_frames": settings.num_frames} if "num_frames" in params else {}
    if "max_area" in params:  # Kontext would otherwise sample at ~1 MP whatever height and width say
        extra["max_area"] = settings.height * settings.width
    if max_sequence_length:
        extra["max_sequence_length"] = max_sequence_length
    images = []
    with torch.no_grad():  # not inference_mode: its tensors could leak into later autograd through caches
        for i, prompt in enumerate(settings.prompts):
            generator = torch.Generator(device or "cpu").manual_seed(settings.seed + i)
            if settings.images:  # an edit family's sources for this prompt, as `raydiff sample --image` passes them
                key = settings.condition_key or family.data_keys.sampling[0]
                call_kwargs = (conditions or family.sampling_conditions)({key: settings.images[i]})
            out = diffusers_pipe(prompt=prompt, num_inference_steps=settings.steps, height=settings.height,
                                 width=settings.width, generator=generator, output_type="pil",
                                 **family.sampling_kwargs(diffusers_pipe, settings.guidance), **extra,
                                 **(call_kwargs or {}))
            images.append(out.frames[0][0] if hasattr(out, "frames") else out.images[0])
    return images


@contextmanager
def _sampling_mode(modules: list[torch.nn.Module]):
    """eval() for sampling; every submodule's `.training` and every parameter's `requires_grad` restored
    afterwards (peft's enable_adapters re-enables grads on the adapter, whatever they were)."""
    training = [(m, m.training) for root in modules for m in root.modules()]
    grads = [(p, p.requires_grad) for root in modules for p in root.parameters()]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


def _has_adapter(model) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _modules(training_pipe) -> list[torch.nn.Module]:
    return [m for m in training_pipe.pipe.components.values() if isinstance(m, torch.nn.Module)]


def _sample(training_pipe, settings: ValidationSettings) -> list[Image.Image]:
    # Prompts encoded with the training's text length, so samples show what training conditioned on.
    tokens = getattr(training_pipe, "max_sequence_length", None)
    return sample_images(type(training_pipe), training_pipe.pipe, settings, max_sequence_length=tokens,
                         conditions=training_pipe.validation_conditions)


def sample_base_images(training_pipe, settings: ValidationSettings) -> list[Image.Image] | None:
    """The base model's images (LoRA disabled), same seeds; None when the DiT has no adapter to disable (full
    fine-tuning, a ControlNet): such grids have no base row. They never change during a LoRA run, so a loop
    can compute them once and pass them to every `write_validation(..., base_images=...)`."""
    dit = getattr(training_pipe.pipe, training_pipe.dit_name)
    if not _has_adapter(dit):
        return None
    _free_memory()
    with _sampling_mode(_modules(training_pipe)):  # restores requires_grad after enable_adapters resets it
        dit.disable_adapters()
        try:
            return _sample(training_pipe, settings)
        finally:
            dit.enable_adapters()


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equally sized images pasted into one image, left to right, top to bottom."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB"), (x * w, y * h))
    return grid


def condition_cell(sources: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """A prompt's condition images side by side, each fitted (aspect kept) into its share of a `size` cell."""
    w, h = size
    cell = Image.new("RGB", size, "white")
    for i, source in enumerate(sources):
        fitted = source.copy()
        fitted.thumbnail((w // len(sources), h))
        cell.paste(fitted, (i * (w // len(sources)), (h - fitted.height) // 2))
    return cell


@contextmanager
def _lora_weights(dit, state_dict: dict | None, prefix: str):
    """Temporarily load `state_dict` (diffusers keys, `{prefix}.<module>.lora_A.weight`) into the injected
    adapter in place; the training weights are copied back afterwards, so the optimizer's params stay."""
    if state_dict is None:
        yield
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = {k: v.detach().clone() for k, v in get_peft_model_state_dict(dit).items()}
    sd = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if set(sd) != set(saved):
        raise ValueError(f"the LoRA state dict does not match the injected adapter: {len(sd)} vs {len(saved)} keys")
    set_peft_model_state_dict(dit, sd)
    try:
        yield
    finally:
        set_peft_model_state_dict(dit, saved)


def write_validation(checkpoint_dir: str, training_pipe, lora_state_dict: dict | None, settings: ValidationSettings,
                     *, base_images: list[Image.Image] | None = None) -> dict:
    """Write `samples/<i>.png` (one per prompt, current weights) and `samples/grid.png` under
    `checkpoint_dir`; returns {"samples": [paths], "grid": path}.

    grid.png has one column per prompt; with `settings.images` the top row shows them; then the base model (the
    transformer's LoRA disabled, or `base_images` when given), the bottom row the LoRA, same seeds. With no
    adapter and no `base_images` (full fine-tuning), the grid is the samples' single row.

    `lora_state_dict`: None samples the transformer as it is (the LoRA being trained). A dict in
    diffusers key format (what `trainable_state_dict()` returns, e.g. EMA weights) is loaded into the
    injected adapter for sampling only; the training weights are restored afterwards.

    Memory: the diffusers pipeline reuses the components already loaded for training (text encoders,
    VAE, the transformer with its LoRA), so there is no second copy of the weights. The extra cost is
    sampling activations at batch 1 (2 with CFG) under no_grad, much less than a training step's,
    plus one VAE decode at full resolution, which for large images can be the peak. The CUDA caching
    allocator is emptied first so the training step's cached blocks are available. Each module's
    `.training` flag and each parameter's `requires_grad` are restored; the LoRA is enabled again.
    Time: (1 + base row) x prompts x steps transformer calls.
    """
    dit = getattr(training_pipe.pipe, training_pipe.dit_name)
    if base_images is None:
        base_images = sample_base_images(training_pipe, settings)
    _free_memory()
    with _sampling_mode(_modules(training_pipe)), _lora_weights(dit, lora_state_dict, training_pipe.dit_name):
        images = _sample(training_pipe, settings)
    _free_memory()

    directory = os.path.join(checkpoint_dir, "samples")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(directory, f"{i}.png"))
        image.save(paths[-1])
    grid_path = os.path.join(directory, "grid.png")
    rows = [list(base_images), images] if base_images else [images]
    if settings.images:  # the sources on top, so each column reads source -> base -> trained
        rows.insert(0, [condition_cell(sources, images[0].size) for sources in settings.images])
    make_grid(rows).save(grid_path)
    return {"samples": paths, "grid": grid_path}
