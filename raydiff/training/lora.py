"""LoRA helpers as plain functions: inject, read and load adapters in diffusers' key format.

Saved keys look like `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (no peft
`.default.`), which is what diffusers' `load_lora_weights` and most tools expect.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_FILE = "pytorch_lora_weights.safetensors"


def inject_lora(model: torch.nn.Module, *, target_modules: list[str], rank: int, alpha: float | None) -> LoraConfig:
    """Add a peft LoRA adapter (B = 0, so the model is unchanged until trained); LoRA params in fp32
    even when the frozen base is bf16, so small updates are not rounded away."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True)
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {target_modules} match no module of {type(model).__name__}: {err}") from None
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return config


def lora_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Adapter weights as `{prefix}.{module path}.lora_A/B.weight`, contiguous CPU tensors."""
    sd = get_peft_model_state_dict(model)
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def adapter_metadata(config: LoraConfig) -> dict:
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def save_lora(directory: str, pipeline_cls, dit_name: str, state_dict: dict, config: LoraConfig) -> None:
    """Write `pytorch_lora_weights.safetensors` with the family's diffusers pipeline, rank and alpha in metadata."""
    stripped = {k[len(dit_name) + 1:]: v for k, v in state_dict.items()}
    pipeline_cls.save_lora_weights(directory, **{f"{dit_name}_lora_layers": stripped,
                                                 f"{dit_name}_lora_adapter_metadata": adapter_metadata(config)})


def load_lora_into(model: torch.nn.Module, path: str, prefix: str) -> None:
    """Load a diffusers-format LoRA file (or a directory holding one) into an injected adapter, strictly."""
    if os.path.isdir(path):
        path = os.path.join(path, LORA_FILE)
    sd = load_file(path)
    sd = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    result = set_peft_model_state_dict(model, sd)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys match no LoRA module, e.g. {unexpected[:3]}")
    expected = set(get_peft_model_state_dict(model))
    if missing := expected - set(sd):
        raise ValueError(f"{path}: missing {len(missing)} LoRA keys, e.g. {sorted(missing)[:3]} "
                         "(different rank or target_modules?)")
