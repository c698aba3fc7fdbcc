"""What every model family provides, and the few helpers they share.

A family is one file with one class that satisfies `TrainingPipeline`: its components (a
diffusers pipeline object holds them), its ordered units, its `model_fn`, its timestep
schedule, its LoRA key prefix (`dit_name`) and the diffusers pipeline class used for
sampling and LoRA loading. Training reuses the units and `model_fn` so training and
inference cannot drift apart (DiffSynth-Studio's first principle).

Tensor conventions shared by all families:
  image   (B, 3, H, W) or video (B, 3, F, H, W), float in [-1, 1]
  latents (B, C, h, w) or (B, C, f, h, w), normalised, *unpacked* — packing, position ids and
          timestep scaling happen inside `model_fn`, so the loss never sees them
  sigma   (B,) float in [0, 1]
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from raydiff.training.flow_matching import FlowSchedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PipelineUnit:
    """One preprocessing step: reads `input_params` from the inputs dict, returns `output_params`.

    `onload_model_names` lists the components it calls; a unit that calls no trainable model and
    draws no random numbers can run ahead of training (in a Ray Data stage or a cache).
    """

    name: str
    fn: Callable[[Any, dict], dict]
    input_params: tuple[str, ...]
    output_params: tuple[str, ...]
    onload_model_names: tuple[str, ...] = ()

    def __call__(self, pipe, inputs: dict) -> dict:
        missing = [p for p in self.input_params if p not in inputs]
        if missing:
            raise KeyError(f"unit {self.name!r} needs {missing}; inputs hold {sorted(inputs)}")
        out = self.fn(pipe, inputs)
        assert set(out) == set(self.output_params), f"unit {self.name} returned {sorted(out)}"
        return out


class TrainingPipeline(Protocol):
    family: ClassVar[str]
    diffusers_class: ClassVar[type]  # sampling, save_lora_weights / load_lora_weights
    dit_name: ClassVar[str]  # the denoiser's component name; also the LoRA key prefix
    component_names: ClassVar[tuple[str, ...]]  # what `from_pretrained(components=...)` may skip
    schedule: ClassVar[FlowSchedule]  # training timestep defaults
    default_lora_targets: ClassVar[list[str]]
    units: list[PipelineUnit]
    pipe: Any  # the diffusers pipeline holding the components
    device: torch.device

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype, device, components: Sequence[str] | None = None,
                        **options) -> "TrainingPipeline": ...

    def model_fn(self, latents: torch.Tensor, sigma: torch.Tensor, **conditions) -> torch.Tensor:
        """Denoiser prediction (velocity), same shape as `latents`, float32."""

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens the denoiser sees for these latents (resolution-dependent shift)."""

    @staticmethod
    def write_tiny(path: str, seed: int = 0) -> None:
        """Write a complete tiny random diffusers-format pipeline to `path`, offline."""


FAMILY_MODULES = {
    "flux": "raydiff.pipelines.flux:FluxImagePipeline",
    "qwen_image": "raydiff.pipelines.qwen_image:QwenImagePipeline",
    "sd3": "raydiff.pipelines.sd3:SD3ImagePipeline",
    "wan": "raydiff.pipelines.wan:WanVideoPipeline",
}


def get_pipeline_class(family: str) -> type:
    try:
        module, name = FAMILY_MODULES[family].split(":")
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_MODULES)}") from None
    return getattr(importlib.import_module(module), name)


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
        if uses_trainable or set(unit.input_params) & step_outputs:
            step.append(unit)
            step_outputs |= set(unit.output_params)
        else:
            encode.append(unit)
    return encode, step


def load_diffusers_pipeline(diffusers_class: type, path: str, *, dtype: torch.dtype, components: Sequence[str] | None,
                            all_components: Sequence[str], revision: str | None = None,
                            trust_remote_code: bool = False):
    """Load a diffusers-format directory or hub id; components not in `components` are skipped (None),
    so a DiT-only trainer never constructs the VAE or text encoders."""
    skip = {} if components is None else {c: None for c in all_components if c not in components}
    kwargs = dict(dtype=dtype, revision=revision, **skip)
    if trust_remote_code:  # only ever when the user's config says so
        kwargs["trust_remote_code"] = True
    return diffusers_class.from_pretrained(path, **kwargs)


def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                    components: Sequence[str] | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, **options):
    """The families' shared `from_pretrained` (bound as a classmethod): load `cls.diffusers_class` with
    the components named in `cls.component_names`, move it to `device`, wrap it in `cls`."""
    pipe = load_diffusers_pipeline(cls.diffusers_class, path, dtype=dtype, components=components,
                                   all_components=cls.component_names, revision=revision,
                                   trust_remote_code=trust_remote_code)
    return cls(pipe.to(device), device, **options)
