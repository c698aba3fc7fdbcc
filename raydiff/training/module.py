"""The training module (DiffSynth's `DiffusionTrainingModule`): a pipeline switched to training mode
whose `forward(data)` runs the pipeline's units and returns `FlowMatchSFTLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raydiff.config import LossConfig, RaydiffConfig
from raydiff.diffusion.loss import FlowMatchSFTLoss
from raydiff.pipelines.base import DTYPES, repeated_blocks, run_units, split_units
from raydiff.registry import get_pipeline_class
from raydiff.training import lora as lora_lib


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.pipe.components.items() if isinstance(m, torch.nn.Module)}


def switch_pipe_to_training_mode(pipe, *, trainable_models: Sequence[str] = (), lora_base_model: str | None = None,
                                 lora_target_modules: Sequence[str] | None = None, lora_rank: int = 8,
                                 lora_alpha: float | None = None, lora_checkpoint: str | None = None,
                                 gradient_checkpointing: bool = True, lora_type: str = "lora", lokr_factor: int = -1):
    """Freeze everything, then make `trainable_models` fully trainable (fp32) and/or inject an adapter of
    `lora_type` (lora, dora, lokr, loha) into `lora_base_model` (`lora_target_modules` None: the family's
    `default_lora_targets`). Returns the peft config (or None)."""
    models = _components(pipe)
    for name in [*trainable_models, *([lora_base_model] if lora_base_model else [])]:
        if name not in models:
            raise ValueError(f"no model named {name!r} in the {pipe.family} pipeline; it has {sorted(models)}")
    if quantized := sorted(set(trainable_models) & set(pipe.quantized)):
        raise ValueError(f"{quantized} are quantized (model.quantize) and cannot be trained in full; train a LoRA")
    for m in models.values():
        m.requires_grad_(False).eval()
    for name in trainable_models:
        models[name].float().requires_grad_(True).train()
    lora_config = None
    if lora_base_model:
        base = models[lora_base_model]
        targets = pipe.default_lora_targets if lora_target_modules is None else lora_target_modules
        lora_config = lora_lib.inject_lora(base, target_modules=list(targets), rank=lora_rank, alpha=lora_alpha,
                                           adapter_type=lora_type, lokr_factor=lokr_factor,
                                           defaults=lora_target_modules is None)
        base.train()
        if lora_checkpoint:
            lora_lib.load_lora_into(base, lora_checkpoint, lora_lib.key_prefix(lora_base_model), family=pipe.family,
                                    config=lora_config)
    if gradient_checkpointing:
        for name in {*trainable_models, *([lora_base_model] if lora_base_model else [])}:
            # diffusers' default checkpoint function is non-reentrant, which DDP and frozen inputs need.
            models[name].enable_gradient_checkpointing()
    return lora_config


class DiffusionTrainingModule(torch.nn.Module):
    """Holds `self.pipe`; subclasses load it in `__init__` (and may compute the loss their own way in
    `forward(data)`).

    The pipeline's models are registered as submodules so `.to(device)` and DDP see them; only
    parameters with requires_grad (LoRA or `trainable_models`) are optimized and saved.
    """

    pipe = None
    lora_config = None
    lora_base_model: str | None = None
    loss_config = LossConfig()

    def register_pipe(self, pipe) -> None:
        self.pipe = pipe
        self.models = torch.nn.ModuleDict(_components(pipe))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA in diffusers' key format, or the full trainable models as `{name}.{param}`."""
        if self.lora_config is not None:
            base = self.lora_base_model
            return lora_lib.lora_state_dict(self.models[base], lora_lib.key_prefix(base))
        return {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in self.models.items()
                for k, v in m.state_dict().items() if m.training}

    def units_to_run(self, data: dict):
        """Units whose outputs the batch does not already carry (stream/cache batches carry latents)."""
        return [u for u in self.pipe.units if not set(u.output_params) <= data.keys()]

    def run_units(self, data: dict) -> dict:
        """The pipeline's units on a batch. Units of frozen models run without autograd: they keep no
        activations for a backward pass, and compute exactly what stream/cache encoders compute."""
        if getattr(self, "_unit_split", None) is None:  # trainability is settled once the module is built
            trainable = [name for name, m in self.models.items() if any(p.requires_grad for p in m.parameters())]
            self._unit_split = split_units(self.pipe, trainable)
        frozen, step = self._unit_split
        todo = self.units_to_run(data)
        with torch.no_grad():
            inputs = run_units(self.pipe, data, [u for u in frozen if u in todo])
        return run_units(self.pipe, inputs, [u for u in step if u in todo])

    def forward(self, data: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The pipeline's units on the batch, then `FlowMatchSFTLoss` over its `model_fn`."""
        return FlowMatchSFTLoss(self.pipe, self.run_units(data), self.loss_config, generator or torch.Generator())


class PipelineTrainingModule(DiffusionTrainingModule):
    """The config-driven training module used by `raydiff train`, for every family."""

    def __init__(self, cfg: RaydiffConfig, device="cpu", components: Sequence[str] | None = None):
        super().__init__()
        cls = get_pipeline_class(cfg.model.family)
        pipe = cls.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=device,
                                   components=components, revision=cfg.model.revision,
                                   trust_remote_code=cfg.model.trust_remote_code, guidance=cfg.model.guidance,
                                   max_sequence_length=cfg.model.max_sequence_length, quantize=cfg.model.quantize,
                                   quantize_text_encoders=cfg.model.quantize_text_encoders, expert=cfg.model.expert,
                                   **cfg.model.family_options())
        self.loss_config = cfg.loss
        self.lora_base_model = cfg.lora.base_model if cfg.lora else None
        self.lora_config = switch_pipe_to_training_mode(
            pipe, trainable_models=cfg.train.trainable_models, lora_base_model=self.lora_base_model,
            lora_target_modules=cfg.lora.target_modules if cfg.lora else None,
            lora_rank=cfg.lora.rank if cfg.lora else 0,
            lora_alpha=cfg.lora.alpha if cfg.lora else None, lora_checkpoint=cfg.lora.init_from if cfg.lora else None,
            gradient_checkpointing=cfg.train.gradient_checkpointing, lora_type=cfg.lora.type if cfg.lora else "lora",
            lokr_factor=cfg.lora.lokr_factor if cfg.lora else -1)
        self.register_pipe(pipe)
        speed_up(getattr(pipe.pipe, pipe.dit_name), cfg.train.attention_backend,
                 cfg.train.compile_backend if cfg.train.compile else None)


def speed_up(dit: torch.nn.Module, attention_backend: str | None, compile_backend: str | None) -> None:
    """Pick a diffusers attention backend and compile the repeated transformer blocks in place.
    Regional compilation: every block of a type shares one compiled graph, so compile time does not
    grow with depth and a step never recompiles (shapes are fixed per bucket)."""
    if attention_backend:
        dit.set_attention_backend(attention_backend)
    elif torch.cuda.is_available():
        # SDPA without its cuDNN kernel (flash / memory-efficient remain): cuDNN's attention backward
        # failed with an illegal memory access for FLUX at 4608 tokens in bf16 (H200, torch 2.11).
        torch.backends.cuda.enable_cudnn_sdp(False)
    if compile_backend:
        for block in repeated_blocks(dit):
            block.compile(backend=compile_backend)
