"""What every model family provides, and the mechanics they share.

A family is one file with one class deriving from `FamilyPipeline`: its components (a diffusers
pipeline object holds them), its ordered units, its `model_fn`, its timestep schedule and its
quirks as class attributes. Training reuses the units and `model_fn` so training and inference
cannot drift apart (DiffSynth-Studio's first principle). Families are found by name through
`raydiff.registry`.

Tensor conventions shared by all families:
  image   (B, 3, H, W) or video (B, 3, F, H, W), float in [-1, 1]
  latents (B, C, h, w) or (B, C, f, h, w), normalised, *unpacked* — packing, position ids and
          timestep scaling happen inside `model_fn`, so the loss never sees them
  sigma   (B,) float in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from raydiff.config import CONTROLNET, DTYPE_NAMES, EXPERT_COMPONENTS, ControlNetConfig, RaydiffConfig
from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.pipelines.controlnet import (
    CONTROL_IMAGE,
    CONTROL_LATENTS,
    build_controlnet,
    control_embedder,
    controlnet_residuals,
    controlnet_setting,
    matching_inputs,
    with_controlnet,
)
from raydiff.pipelines.quantize import quantize_model, text_encoder_skip
from raydiff.registry import DataKeys

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_MIXED_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """`train.mixed_precision` (`no` | `bf16` | `fp16`) -> the autocast dtype, None for `no`."""
    name = _MIXED_PRECISION.get(mixed_precision)
    return DTYPES[name] if name else None


@dataclass(frozen=True)
class PipelineUnit:
    """One preprocessing step: reads `input_params` from the inputs dict, returns `output_params`.

    An input given as a tuple of names needs one of them (Wan reads a `video` or an `image`).
    `onload_model_names` lists the components it calls; a unit that calls no trainable model and
    draws no random numbers can run ahead of training (in a Ray Data stage or a cache).
    """

    name: str
    fn: Callable[[Any, dict], dict]
    input_params: tuple[str | tuple[str, ...], ...]
    output_params: tuple[str, ...]
    onload_model_names: tuple[str, ...] = ()

    @property
    def input_names(self) -> set[str]:
        """Every name the unit may read (alternatives flattened)."""
        return {n for p in self.input_params for n in ((p,) if isinstance(p, str) else p)}

    def __call__(self, pipe, inputs: dict) -> dict:
        missing = [p if isinstance(p, str) else " or ".join(p) for p in self.input_params
                   if not any(n in inputs for n in ((p,) if isinstance(p, str) else p))]
        if missing:
            raise KeyError(f"unit {self.name!r} needs {missing}; inputs hold {sorted(inputs)}")
        out = self.fn(pipe, inputs)
        assert set(out) == set(self.output_params), f"unit {self.name} returned {sorted(out)}"
        return out


class TrainingPipeline(Protocol):
    """What the loss, the training module and the data layer use of a family."""

    family: str
    dit_name: str
    component_names: tuple[str, ...]
    schedule: FlowSchedule
    sigma_range: tuple[float, float] | None
    shared_outputs: frozenset[str]
    units: list[PipelineUnit]
    pipe: Any  # the diffusers pipeline holding the components
    device: torch.device

    def model_fn(self, latents: torch.Tensor, sigma: torch.Tensor, **conditions) -> torch.Tensor: ...

    def image_seq_len(self, latents: torch.Tensor) -> int: ...


class FamilyPipeline:
    """A model family: a diffusers pipeline wrapped with training units and `model_fn`.

    Subclasses set the class attributes and write `make_units` and `model_fn`; this base holds what is
    truly the same across families (loading, 2x2 packing, the image sequence length).
    """

    family: ClassVar[str]
    diffusers_class: ClassVar[type]  # sampling, save_lora_weights / load_lora_weights
    dit_name: ClassVar[str] = "transformer"  # the denoiser's component name; also the LoRA key prefix
    component_names: ClassVar[tuple[str, ...]]  # what `from_pretrained(components=...)` may skip
    schedule: ClassVar[FlowSchedule]  # training timestep defaults
    default_lora_targets: ClassVar[list[str]]  # `lora.target_modules` when the config leaves it unset
    default_max_sequence_length: ClassVar[int] = 512  # text tokens; the diffusers pipeline's default
    data_keys: ClassVar[DataKeys] = DataKeys(("image",))  # what the units read from the metadata
    # Only σ in [lo, hi) train: a two-expert checkpoint's share for the expert being trained (set per instance).
    sigma_range: tuple[float, float] | None = None
    # Unit outputs without a batch axis whose first dimension could pass for one (FLUX's text ids).
    shared_outputs: ClassVar[frozenset[str]] = frozenset()
    # LoRA export: {original module name: (diffusers parts, each part's width multiple or None)} for
    # `comfyui`/`kohya` naming (raydiff.training.lora_formats); None = diffusers format only.
    lora_original_names: ClassVar[dict | None] = None
    comfyui_lora_suffixes: ClassVar[tuple[str, str]] = ("lora_A", "lora_B")
    comfyui_lora_alpha: ClassVar[bool] = True  # False: no `.alpha` keys, the scale folded into the weights
    # What `raydiff export --format diffsynth` writes: the layout DiffSynth-Studio's loader for this family reads
    # ("diffsynth": peft's names with `.default.`; "kohya": FLUX's loader maps kohya names onto its fused modules;
    # "original": the original module names with peft's `.default.`, for a DiT that keeps them, as Wan's does).
    diffsynth_lora_format: ClassVar[str] = "diffsynth"
    # DiffSynth's own module names where its DiT differs from diffusers' ({DiffSynth name: original name}), so
    # LoRAs DiffSynth trained import; None: DiffSynth uses diffusers' names.
    diffsynth_lora_names: ClassVar[dict | None] = None
    patch_size: ClassVar[int] = 2  # latent pixels per token side
    # `model.quantize`: fnmatch patterns of DiT modules left unquantized (embedders, the norms' modulation
    # linears, the final projection: small layers whose error every token would share).
    quantize_skip: ClassVar[tuple[str, ...]] = ("*embed*", "*norm*", "proj_out")
    quantized: dict[str, str] = {}  # component -> quantization mode, set by `from_pretrained`
    tiny_variants: ClassVar[tuple[str, ...]] = ()  # `write_tiny(variant=...)` choices, the first the default
    # `model.controlnet` (raydiff.pipelines.controlnet): the diffusers ControlNet model and pipeline, a new one's
    # layer-count keys, extra `from_transformer` arguments, {output field: DiT keyword} of its residuals, and the
    # config keys of ControlNets that need more than the control latents (refused). None: no ControlNet.
    controlnet_class: ClassVar[type | None] = None
    controlnet_pipeline_class: ClassVar[type | None] = None
    controlnet_layers: ClassVar[tuple[str, ...]] = ("num_layers",)
    controlnet_init: ClassVar[dict] = {}
    controlnet_residuals: ClassVar[dict[str, str]] = {}
    controlnet_refused: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe, device, *, guidance: float = 1.0, max_sequence_length: int | None = None,
                 expert: str | None = None, controlnet: ControlNetConfig | None = None, masked: bool = False):
        if controlnet is not None and self.controlnet_class is None:
            raise ValueError(f"model.controlnet: the {self.family} family has no ControlNet")
        self.controlnet_spec = controlnet
        self.pipe, self.device = pipe, torch.device(device)
        self.guidance = guidance  # a distilled-guidance embedding's input (FLUX.1-dev); others ignore it
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.expert = expert
        boundary = pipe.config.get("boundary_ratio")
        if (expert is None) != (boundary is None):
            raise ValueError(f"model.expert {expert}: this {type(pipe).__name__} has "
                             + ("one denoiser (no boundary_ratio)" if boundary is None else
                                f"two experts (boundary_ratio {boundary}); set model.expert: high or low"))
        if expert is not None:
            # As the pipeline routes them: timesteps >= boundary_ratio x 1000 (sigma >= boundary) go to the
            # high-noise `transformer`, the rest to `transformer_2`; each expert trains on its own share.
            self.dit_name = EXPERT_COMPONENTS[expert]
            self.sigma_range = (boundary, math.inf) if expert == "high" else (0.0, boundary)
        self.units = [*self.make_units(), *self.controlnet_units(), *([LOSS_MASK_UNIT] if masked else [])]

    @classmethod
    def from_config(cls, cfg: RaydiffConfig, device="cpu", components: Sequence[str] | None = None) -> FamilyPipeline:
        """The family as `cfg` describes it: `from_pretrained` with `cfg.model`'s settings, and the loss-mask
        unit when the data has a `mask` column."""
        m = cfg.model
        return cls.from_pretrained(m.path, dtype=DTYPES[m.dtype], device=device, components=components,
                                   revision=m.revision, trust_remote_code=m.trust_remote_code, quantize=m.quantize,
                                   quantize_text_encoders=m.quantize_text_encoders, guidance=m.guidance,
                                   max_sequence_length=m.max_sequence_length, expert=m.expert,
                                   controlnet=m.controlnet, masked="mask" in cfg.data.data_file_keys,
                                   **m.family_options())

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        components: Sequence[str] | None = None, revision: str | None = None,
                        trust_remote_code: bool = False, quantize: str | None = None,
                        quantize_text_encoders: bool = False, **options) -> FamilyPipeline:
        """Load `cls.diffusers_class` from a diffusers-format directory or hub id. Components left out
        of `components` are skipped (None), so a DiT-only trainer never constructs the VAE or text
        encoders. `quantize` (int8 | fp8 | nf4): the DiT (and with `quantize_text_encoders` the text
        encoders) is quantized layer by layer on its way to `device` (raydiff.pipelines.quantize).
        `controlnet` (a `ControlNetConfig`, in `options`): loaded (or made from the unquantized DiT) unless
        `components` leaves it out; the family then holds its diffusers ControlNet pipeline."""
        skip = {} if components is None else {c: None for c in cls.component_names if c not in components}
        dit_name = EXPERT_COMPONENTS.get(options.get("expert"), cls.dit_name)
        if options.get("expert"):  # the other expert is never loaded: a 14B model each
            skip.update({c: None for c in EXPERT_COMPONENTS.values() if c != dit_name})
        kwargs = dict(dtype=dtype, revision=revision, **skip)
        if trust_remote_code:  # only ever when the user's config says so
            kwargs["trust_remote_code"] = True
        pipe = cls.load_diffusers(path, **kwargs)
        spec, controlnet = options.get("controlnet"), None
        if spec is not None and cls.controlnet_class is not None and (components is None or CONTROLNET in components):
            controlnet = build_controlnet(cls, spec, getattr(pipe, dit_name), dtype).to(device)
        quantized = cls.quantize_plan(pipe, quantize, quantize_text_encoders, dit_name)
        for name, component in pipe.components.items():
            if name in quantized:
                quantize_model(component, quantize, skip=quantized[name], device=device)
            elif isinstance(component, torch.nn.Module):
                component.to(device)
        if controlnet is not None:
            pipe = with_controlnet(cls, pipe, controlnet)
        family = cls(pipe, device, **options)
        family.quantized = {name: quantize for name in quantized}
        return family

    @classmethod
    def load_diffusers(cls, path: str, **kwargs):
        """`diffusers_class.from_pretrained(path, **kwargs)`: the family's diffusers pipeline, as training, validation
        and `raydiff sample` load it (a family whose component needs loading help overrides this)."""
        return cls.diffusers_class.from_pretrained(path, **kwargs)

    @classmethod
    def quantize_plan(cls, pipe, quantize: str | None, text_encoders: bool,
                      dit_name: str) -> dict[str, tuple[str, ...]]:
        """{component: module patterns left unquantized} for the loaded components `quantize` applies to
        (`dit_name`: the denoiser, a two-expert run's expert)."""
        if quantize is None:
            return {}
        plan = {dit_name: cls.quantize_skip}
        if text_encoders:
            plan.update({name: text_encoder_skip(m) for name, m in pipe.components.items()
                         if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)})
        return {name: patterns for name, patterns in plan.items() if pipe.components.get(name) is not None}

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Every component `from_pretrained(components=...)` may name: the pipeline's, and a ControlNet."""
        return cls.component_names + ((CONTROLNET,) if cls.controlnet_class is not None else ())

    def make_units(self) -> list[PipelineUnit]:
        raise NotImplementedError

    # --- ControlNet (model.controlnet) --------------------------------------------------------------

    @property
    def controlnet(self) -> torch.nn.Module | None:
        """The ControlNet being trained, None without one (or where it is not loaded: encoders)."""
        return getattr(self.pipe, CONTROLNET, None)

    def controlnet_units(self) -> list[PipelineUnit]:
        """The control image's unit, with `model.controlnet`."""
        if self.controlnet_spec is None:
            return []
        return [PipelineUnit("control_embedder", control_embedder, (CONTROL_IMAGE,), (CONTROL_LATENTS,), ("vae",))]

    def controlnet_setting(self, key: str):
        """A setting of the ControlNet's config, also where its weights are not loaded (encoders)."""
        if self.controlnet is not None:
            return self.controlnet.config.get(key)
        return controlnet_setting(type(self), self.controlnet_spec, key)

    def encode_control(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) control image in [-1, 1] -> (B, C, h, w) float32 latents, as the family's ControlNet pipeline
        encodes it (FLUX: like the target; families override). The mode, not a sample, as for the target."""
        return scaled_vae_latents(self.pipe.vae, image)

    def controlnet_inputs(self, dit_kwargs: dict, control_latents: torch.Tensor) -> dict:
        """The ControlNet's call: the DiT inputs it takes, and the control latents packed as the DiT's tokens."""
        return {**matching_inputs(self.controlnet, dit_kwargs), "controlnet_cond": pack_latents(control_latents)}

    def call_dit(self, control_latents: torch.Tensor | None = None, **dit_kwargs) -> torch.Tensor:
        """The DiT's first output for `dit_kwargs`; with `model.controlnet`, after the ControlNet's call on the
        same inputs and `control_latents`, whose residuals join the DiT's as the family's ControlNet pipeline
        passes them."""
        if self.controlnet_spec is not None:
            if control_latents is None:
                raise ValueError(f"model.controlnet: model_fn needs {CONTROL_LATENTS} (the control_image's unit)")
            dit_kwargs.update(controlnet_residuals(self, dit_kwargs, control_latents))
        return self.dit(**dit_kwargs, return_dict=False)[0]

    def model_fn(self, latents: torch.Tensor, sigma: torch.Tensor, **conditions) -> torch.Tensor:
        """Denoiser prediction (velocity), same shape as `latents`, float32."""
        raise NotImplementedError

    @property
    def dit(self):
        """The denoiser this run trains and calls: `dit_name`'s component (a two-expert run's expert)."""
        return getattr(self.pipe, self.dit_name)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens the denoiser sees for these latents (the resolution-dependent shift's L)."""
        return (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)

    @classmethod
    def sampling_kwargs(cls, pipe, guidance: float) -> dict:
        """Keyword arguments that make the diffusers pipeline `pipe` sample with this guidance strength."""
        return {"guidance_scale": guidance}

    @classmethod
    def sampling_conditions(cls, conditions: dict) -> dict:
        """Keyword arguments of the diffusers pipeline's call for condition inputs (`raydiff sample --image`,
        VACE's control video; PIL images, lists of them for videos). A family without conditions takes none."""
        if conditions:
            raise ValueError(f"the {cls.family} family samples from a prompt alone; got {sorted(conditions)}")
        return {}

    def validation_conditions(self, conditions: dict) -> dict:
        """`sampling_conditions` for a validation sample during training; a family whose training resizes its
        conditions otherwise than its pipeline does (`model.edit_image_pixels`) passes them as training saw them.
        A ControlNet run's `control_image` (a one-image list) goes to its ControlNet pipeline's own keyword, which
        resizes it to the sample's size as training resized it to the target's."""
        conditions = dict(conditions)
        control = conditions.pop(CONTROL_IMAGE, None)
        return {**self.sampling_conditions(conditions), **({CONTROL_IMAGE: control[0]} if control else {})}

    @staticmethod
    def write_tiny(path: str, seed: int = 0, variant: str | None = None) -> None:
        """Write a complete tiny random diffusers-format pipeline to `path`, offline (`variant`: one of
        `tiny_variants`, for families that cover several checkpoints)."""
        raise NotImplementedError


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 latent patches as tokens (FLUX, Qwen-Image)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents`."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def scaled_vae_latents(vae, image: torch.Tensor, shift_factor: float | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> float32 (B, C, H/f, W/f): an `AutoencoderKL`'s mode, normalised as FLUX,
    SD3 and Z-Image pipelines invert at decode (`latents / scaling_factor + shift_factor`). The mode, not a
    sample: deterministic, so cached and inline latents agree. `shift_factor`: another shift than the VAE's."""
    latents = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor if shift_factor is None else shift_factor
    return ((latents - shift) * vae.config.scaling_factor).float()


def to_pil(image: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images, the pixels the decode stage read (its uint8 values round-trip)."""
    from PIL import Image

    pixels = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a DiT: every entry of its `ModuleList` children (`transformer_blocks`,
    `single_transformer_blocks`, `blocks` in diffusers' DiTs). FSDP wraps them one by one and
    regional compilation compiles each block type once."""
    return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def _loss_mask(p, inputs: dict) -> dict:
    """A `mask` image (B, 3, H, W) in [-1, 1] -> loss weights on the latent grid: its luminance in [0, 1]
    area-averaged to the latents' (h, w), broadcast over channels (and frames); times the family's own
    `loss_mask` when it has one."""
    latents = inputs["latents"]
    gray = (inputs["mask"].float().mean(1, keepdim=True) + 1) / 2
    grid = torch.nn.functional.adaptive_avg_pool2d(gray, latents.shape[-2:])
    grid = grid.view(grid.shape[0], 1, *[1] * (latents.dim() - 4), *latents.shape[-2:])
    return {"loss_mask": grid * inputs["loss_mask"] if "loss_mask" in inputs else grid}


# Runs after the family's units (it needs their latents); no model, so it runs ahead with the encoders.
LOSS_MASK_UNIT = PipelineUnit("loss_mask", _loss_mask, ("mask", "latents"), ("loss_mask",))


def run_units(pipe: TrainingPipeline, inputs: dict, units: Sequence[PipelineUnit] | None = None) -> dict:
    """Run units in order, each adding its outputs to a copy of `inputs`."""
    inputs = dict(inputs)
    for unit in pipe.units if units is None else units:
        inputs.update(unit(pipe, inputs))
    return inputs


def split_units(pipe: TrainingPipeline, trainable: Sequence[str]) -> tuple[list[PipelineUnit], list[PipelineUnit]]:
    """(encode units, per-step units): encode units touch no trainable model and depend only on
    data or other encode units, so their outputs can be computed once per sample."""
    encode, step, step_outputs = [], [], set()
    for unit in pipe.units:
        uses_trainable = set(unit.onload_model_names) & set(trainable)
        if uses_trainable or unit.input_names & step_outputs:
            step.append(unit)
            step_outputs |= set(unit.output_params)
        else:
            encode.append(unit)
    return encode, step
