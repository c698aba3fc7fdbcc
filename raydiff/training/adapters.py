"""Adapter types (`lora.type`): the tensors each stores per adapted module and where its scale lives.

In peft's parameter names, for a module with weight W (out, in) and s = alpha / r:

  lora  lora_A (r, in), lora_B (out, r)                             delta W = s * B @ A
  dora  lora_A, lora_B, lora_magnitude_vector m (out,)              W' = m * (W + s B A) / ||W + s B A|| (per row)
  lokr  lokr_w1 or lokr_w1_a @ lokr_w1_b, lokr_w2 or lokr_w2_a @ lokr_w2_b    delta W = s * kron(w1, w2)
  loha  hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b           delta W = s * (w1_a w1_b) * (w2_a w2_b)

peft applies s to every module of every type. LyCORIS and ComfyUI (comfy/weight_adapter/lokr.py, loha.py) read
an `.alpha` key per module and divide it by that module's rank, except a LoKr module whose two factors are both
full matrices, which they apply at scale 1 whatever its alpha. Each formula is linear in one factor (`SCALED`),
so multiplying that factor by s ("folding") gives weights whose scale is 1: a folded file means the same in a
loader that reads alpha, one that ignores it, and one that applies it its own way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

PARAMS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
SCALED = {"lora": ("lora_B.weight",), "dora": ("lora_B.weight",), "lokr": ("lokr_w1", "lokr_w1_a"),
          "loha": ("hada_w1_a",)}
_ALL_PARAMS = sorted({p for params in PARAMS.values() for p in params}, key=len, reverse=True)

# Formats each type can be written in, and why not the others (raydiff export refuses with the reason).
UNSUPPORTED = {
    "dora": ("diffusers", "DoRA's magnitude vector is read by diffusers/peft only: ComfyUI's `dora_scale` applies "
                          "it with the base weight's norm instead of the adapted one's (ComfyUI PR #15458, open), "
                          "and DiffSynth and kohya loaders have no DoRA"),
    "lokr": ("diffusers|comfyui", "DiffSynth loads lora_A/lora_B pairs only, and kohya names fuse FLUX's q, k and "
                                  "v, which a Kronecker product cannot be split back into"),
    "loha": ("comfyui", "diffusers loads no LoHa (peft's LoHa layers only through `raydiff sample`), DiffSynth "
                        "loads lora_A/lora_B pairs only, and kohya names fuse FLUX's q, k and v"),
}


def check_format(adapter_type: str, fmt: str) -> None:
    """Raise ValueError naming the formats `adapter_type` can be exported to, if `fmt` is not one of them."""
    if adapter_type not in UNSUPPORTED:
        return
    allowed, why = UNSUPPORTED[adapter_type]
    if fmt not in allowed.split("|"):
        raise ValueError(f"a {adapter_type} adapter exports to {allowed.replace('|', ' or ')} only: {why}")


def split_key(key: str) -> tuple[str, str]:
    """`transformer.blocks.0.attn.to_q.lokr_w1` -> (`transformer.blocks.0.attn.to_q`, `lokr_w1`)."""
    for param in _ALL_PARAMS:
        if key.endswith("." + param):
            return key[:-len(param) - 1], param
    raise ValueError(f"{key!r} is no adapter weight of {', '.join(PARAMS)}")


def type_of(params: Iterable[str]) -> str:
    """The adapter type of a state dict from its parameter names (`split_key`'s second part or whole keys)."""
    params = set(params)
    if any("lokr_" in p for p in params):
        return "lokr"
    if any("hada_" in p for p in params):
        return "loha"
    if any("lora_magnitude_vector" in p for p in params):
        return "dora"
    return "lora"


def by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{module.param: tensor}` -> `{module: {param: tensor}}`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, param = split_key(key)
        out.setdefault(module, {})[param] = tensor
    return out


def flatten(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{m}.{p}": t for m, params in modules.items() for p, t in params.items()}


def module_rank(params: dict[str, torch.Tensor]) -> int | None:
    """A module's rank from its tensors; None for a LoKr module whose factors are both full matrices."""
    if "lora_A.weight" in params:
        return params["lora_A.weight"].shape[0]
    if "hada_w1_b" in params:
        return params["hada_w1_b"].shape[0]
    for factor in ("lokr_w2_a", "lokr_w1_a"):
        if factor in params:
            return params[factor].shape[1]
    return None


def lycoris_scale(params: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The scale LyCORIS and ComfyUI apply to a module stored with `alpha` (None: no `.alpha` key): alpha / rank,
    1 without alpha, and 1 for a LoKr module of two full factors."""
    rank = module_rank(params)
    return 1.0 if alpha is None or rank is None else alpha / rank


def scaled(params: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A module's tensors with `factor` folded into the one factor its delta W is linear in."""
    if factor == 1:
        return dict(params)
    key = next(p for scaled_params in SCALED.values() for p in scaled_params if p in params)
    return {**params, key: params[key] * factor}
