"""Which components each side loads in stream and cache mode: an encoder every component but the
trainable ones, a training worker the DiT, the trainable models and the tokenizers. Torch-free, so the
driver and Ray's helper processes can decide without importing a model library."""

from __future__ import annotations

from raydiff.config import RaydiffConfig
from raydiff.registry import get_pipeline_class


def trainable_names(cfg: RaydiffConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.train.trainable_models, *([cfg.lora.base_model] if cfg.lora else [])]))


def worker_models(cfg: RaydiffConfig) -> list[str]:
    """The models only training workers hold in stream/cache mode: the trainable ones and, beside a ControlNet,
    the frozen DiT it feeds (its units, FLUX's guidance, then run in the step: an encoder never loads a DiT)."""
    dit = [cfg.model.denoiser or get_pipeline_class(cfg.model.family).dit_name] if cfg.model.controlnet else []
    return list(dict.fromkeys([*trainable_names(cfg), *dit]))


def encoder_components(cfg: RaydiffConfig) -> list[str]:
    """What an encoder actor loads: every component except the workers' (`worker_models`)."""
    trainable = set(worker_models(cfg))
    return [c for c in get_pipeline_class(cfg.model.family).model_names() if c not in trainable]


def training_components(cfg: RaydiffConfig) -> list[str] | None:
    """What a training worker loads: everything inline (None), else the DiT, the trainable models and
    the tokenizers (small; a trainable text encoder's prompt unit runs in the step and needs them)."""
    if cfg.data.preprocess == "inline":
        return None
    cls = get_pipeline_class(cfg.model.family)
    denoiser = cfg.model.denoiser or cls.dit_name
    wanted = [denoiser, *trainable_names(cfg), *(c for c in cls.component_names if c.startswith("tokenizer"))]
    return [c for c in dict.fromkeys(wanted) if c in cls.model_names()]
