"""ControlNets beside a family's frozen DiT (`model.controlnet`): building one, the control image's unit, and the
call that hands its residuals to the DiT as the family's diffusers ControlNet pipeline does.

A family opts in with class attributes (raydiff.pipelines.base.FamilyPipeline): `controlnet_class` (the
diffusers model), `controlnet_pipeline_class` (sampling, parity), `controlnet_layers` (a new one's layer
counts), `controlnet_residuals` ({ControlNet output field: DiT keyword}), `controlnet_refused` (config keys of
ControlNets that take other inputs than the control image's latents) and, when its ControlNet's inputs differ
from the DiT's, `controlnet_inputs` and `encode_control`.

    FLUX        FluxControlNetModel    -> controlnet_block_samples, controlnet_single_block_samples
    Qwen-Image  QwenImageControlNetModel -> controlnet_block_samples
    SD3         SD3ControlNetModel     -> block_controlnet_hidden_states
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from raydiff.config import CONTROLNET, ControlNetConfig

CONTROL_IMAGE = "control_image"  # the data column
CONTROL_LATENTS = "control_latents"  # its unit's output: (B, C, h, w), normalised like the target's latents


def new_controlnet(family_cls, transformer: torch.nn.Module, layers: dict[str, int]) -> torch.nn.Module:
    """A ControlNet initialised from `transformer` by diffusers' own `from_transformer`: embedders and the first
    blocks copied, the control input and output projections zero (so it starts as a no-op). `layers`: its layer
    counts (`controlnet_layers`). Heads and head width are the transformer's: other widths could copy nothing."""
    cls = family_cls.controlnet_class
    params = inspect.signature(cls.from_transformer).parameters
    widths = {k: transformer.config[k] for k in ("attention_head_dim", "num_attention_heads") if k in params}
    from diffusers.configuration_utils import FrozenDict  # here: the driver imports this module, never diffusers

    before = dict(transformer.config)
    try:
        return cls.from_transformer(transformer, **layers, **widths, **family_cls.controlnet_init)
    finally:
        # diffusers 0.42.1's SD3ControlNetModel.from_transformer writes num_layers into the transformer's own config.
        transformer._internal_dict = FrozenDict(before)


def build_controlnet(family_cls, spec: ControlNetConfig, transformer: torch.nn.Module | None,
                     dtype: torch.dtype) -> torch.nn.Module:
    """`model.controlnet` as a model: continued from `spec.path` (a diffusers folder or hub id), or new from the
    transformer's weights (`spec.num_layers`, ...). Refuses ControlNets that take more than the control image's
    VAE latents (pixel-space hint blocks, union modes, inpainting channels)."""
    cls = family_cls.controlnet_class
    if spec.path is None:
        if transformer is None:
            raise ValueError("a new ControlNet is made from the transformer's weights; load the transformer too")
        layers = {k: getattr(spec, k) for k in family_cls.controlnet_layers}
        return new_controlnet(family_cls, transformer, layers).to(dtype)
    model = cls.from_pretrained(spec.path, dtype=dtype)
    if refused := [k for k in family_cls.controlnet_refused if model.config.get(k)]:
        raise ValueError(f"model.controlnet.path {spec.path}: its config sets {refused}; raydiff trains "
                         f"ControlNets whose only condition is the control image's VAE latents")
    return model


def controlnet_setting(family_cls, spec: ControlNetConfig, key: str) -> Any:
    """A setting of the ControlNet's config without building it (the encoders never load it): its config.json's,
    else the class default (a new one copies the transformer's config, which sets no ControlNet-only key)."""
    cls = family_cls.controlnet_class
    if spec.path is not None:
        config = cls.load_config(spec.path)
        if key in config:
            return config[key]
    return inspect.signature(cls.__init__).parameters[key].default


def with_controlnet(family_cls, pipe, controlnet: torch.nn.Module):
    """The family's diffusers ControlNet pipeline holding `pipe`'s components and `controlnet` (its constructor
    does what the family's pipeline needs, e.g. SD3.5's 8B ControlNets borrow the transformer's patch embedding)."""
    return family_cls.controlnet_pipeline_class(**pipe.components, **{CONTROLNET: controlnet})


def controlnet_residuals(family, dit_kwargs: dict, control_latents: torch.Tensor) -> dict:
    """The ControlNet's call on the DiT's inputs and the control latents -> the DiT keywords that take its
    residuals (`family.controlnet_residuals`). Inputs in the ControlNet's dtype, residuals in the DiT's (a
    trained ControlNet is fp32 beside a bf16 base)."""
    controlnet, dit = family.controlnet, family.dit
    if controlnet is None:
        raise ValueError("model.controlnet is set but the ControlNet was not loaded (components without controlnet)")
    inputs = {k: v.to(controlnet.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in family.controlnet_inputs(dit_kwargs, control_latents).items()}
    out = controlnet(**inputs, return_dict=True)
    return {keyword: None if getattr(out, field) is None else [s.to(dit.dtype) for s in getattr(out, field)]
            for field, keyword in family.controlnet_residuals.items()}


def matching_inputs(controlnet: torch.nn.Module, dit_kwargs: dict) -> dict:
    """The DiT inputs the ControlNet's forward also takes, by name."""
    params = inspect.signature(type(controlnet).forward).parameters
    return {k: v for k, v in dit_kwargs.items() if k in params}


def control_embedder(p, inputs: dict) -> dict:
    """The control unit: `control_image` VAE-encoded as the family's ControlNet pipeline does (`encode_control`).
    It calls only the frozen VAE, so stream and cache mode run it ahead of training."""
    control, image = inputs[CONTROL_IMAGE], inputs.get("image")
    if image is not None and control.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"control_image is {tuple(control.shape[-2:])} (height, width), the image "
                         f"{tuple(image.shape[-2:])}; they must match (the decode stage sizes it to the image)")
    return {CONTROL_LATENTS: p.encode_control(control)}


def write_tiny_controlnet(family_cls, path: str, seed: int = 0) -> str:
    """A tiny ControlNet for the tiny pipeline at `path`, written to `path/controlnet` (offline): one layer of
    each kind from its transformer, with the zero-initialised projections made random so that tests see the
    ControlNet change the DiT's output. Returns the folder."""
    pipe = family_cls.from_pretrained(path, components=[family_cls.dit_name])
    controlnet = new_controlnet(family_cls, pipe.dit, {k: 1 for k in family_cls.controlnet_layers})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = os.path.join(path, CONTROLNET)
    controlnet.save_pretrained(folder)
    return folder
