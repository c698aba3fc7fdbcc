"""LoRA helpers as plain functions: inject, read and load adapters in diffusers' key format.

Saved keys look like `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (no peft
`.default.`), which is what diffusers' `load_lora_weights` and most tools expect.
"""

from __future__ import annotations

import fnmatch
import inspect
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from raydiff.training.lora_formats import LORA_FILE, import_lora, write_diffusers_lora

__all__ = ["LORA_FILE", "adapter_metadata", "inject_lora", "key_prefix", "load_lora_into", "lora_state_dict",
           "resolve_targets", "save_lora"]


def key_prefix(component: str) -> str:
    """The key prefix of a LoRA of `component` in diffusers' files. A LoRA of Wan 2.2's low-noise expert
    `transformer_2` is saved as `transformer.` keys: diffusers' `save_lora_weights` takes no transformer_2
    layers, and `load_lora_weights(..., load_into_transformer_2=True)` reads `transformer.` keys into it."""
    return "transformer" if component == "transformer_2" else component


def resolve_targets(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """`lora.target_modules` as peft takes them: a plain name matches a module path's last parts (peft's rule,
    `to_q`); a name with `*` is a shell pattern over whole module paths (`vace_blocks.*.to_q`: only the VACE
    blocks' projections) and becomes the linear layers it matches."""
    patterns = [t for t in target_modules if "*" in t]
    if not patterns:
        return list(target_modules)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out = [t for t in target_modules if "*" not in t]
    for pattern in patterns:
        matched = [n for n in linear if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"lora.target_modules pattern {pattern!r} matches no linear layer of "
                             f"{type(model).__name__}, e.g. {linear[:3]}")
        out += [n for n in matched if n not in out]
    return out


def inject_lora(model: torch.nn.Module, *, target_modules: list[str], rank: int, alpha: float | None) -> LoraConfig:
    """Add a peft LoRA adapter (B = 0, so the model is unchanged until trained); LoRA params in fp32
    even when the frozen base is bf16, so small updates are not rounded away."""
    target_modules = resolve_targets(model, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True)
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {target_modules} match no module of {type(model).__name__}: "
                         f"{err}") from None
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


def save_lora(directory: str, pipeline_cls, dit_name: str, state_dict: dict, config: LoraConfig,
              weight_name: str = LORA_FILE) -> None:
    """Write `weight_name` (pytorch_lora_weights.safetensors) with the family's diffusers pipeline, rank and
    alpha in metadata. A model its LoRA loader does not take (a ControlNet) gets the same layout under its own
    prefix (`controlnet.`), which the model's `load_lora_adapter(file, prefix="controlnet")` reads."""
    if f"{dit_name}_lora_layers" not in inspect.signature(pipeline_cls.save_lora_weights).parameters:
        os.makedirs(directory, exist_ok=True)
        write_diffusers_lora(os.path.join(directory, weight_name), state_dict, dit_name, config.r,
                             config.lora_alpha, sorted(config.target_modules))
        return
    stripped = {k[len(dit_name) + 1:]: v for k, v in state_dict.items()}
    pipeline_cls.save_lora_weights(directory, weight_name=weight_name,
                                   **{f"{dit_name}_lora_layers": stripped,
                                      f"{dit_name}_lora_adapter_metadata": adapter_metadata(config)})


def load_lora_into(model: torch.nn.Module, path: str, prefix: str, *, family: str | None = None,
                   config: LoraConfig | None = None) -> None:
    """Load a LoRA file or checkpoint directory into an injected adapter, strictly. Any format of
    `lora_formats.FORMATS` is accepted; with `config`, a file trained at another alpha is rescaled so
    it computes the same update under this adapter's alpha / rank."""
    sd, info = import_lora(path, family=family, prefix=prefix)
    sd = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    if config is not None and info.get("lora_alpha") and info.get("r"):
        if info["r"] != config.r:
            raise ValueError(f"{path}: LoRA rank {info['r']} does not match lora.rank {config.r}")
        factor = (info["lora_alpha"] / info["r"]) / (config.lora_alpha / config.r)
        sd = {k: v * factor if "lora_B" in k else v for k, v in sd.items()}
    result = set_peft_model_state_dict(model, sd)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys match no LoRA module, e.g. {unexpected[:3]}")
    expected = set(get_peft_model_state_dict(model))
    if missing := expected - set(sd):
        raise ValueError(f"{path}: missing {len(missing)} LoRA keys, e.g. {sorted(missing)[:3]} "
                         "(different rank or target_modules?)")
