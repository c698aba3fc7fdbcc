"""Quantized frozen weights (`model.quantize`): a model's linear layers stored in int8 or fp8 (torchao
weight-only: the matmul dequantizes on the fly) or nf4 (bitsandbytes 4-bit), layer by layer onto the
device, so the full-precision model never sits on the GPU whole.

A LoRA is injected on top afterwards; peft wraps both kinds: `TorchaoLoraLinear` over torchao's
`Int8Tensor` / `Float8Tensor` weights, and its bitsandbytes `Linear4bit` over `bnb.nn.Linear4bit`
(chosen when the model says `is_loaded_in_4bit`, as transformers' and diffusers' own bnb loaders set
it). The adapter's weights are plain fp32 tensors; only the frozen base is quantized.

Which layers stay as loaded is the family's `quantize_skip` (fnmatch patterns over module names:
embedders, the norms' modulation linears, the final projection), as SimpleTuner and ai-toolkit do;
text encoders keep what their transformers class keeps in fp32 (`_keep_in_fp32_modules`, T5's `wo`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch


def quantizable_linears(model: torch.nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Names of the `nn.Linear` modules of `model` that no fnmatch pattern of `skip` matches."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in skip)]


def quantize_model(model: torch.nn.Module, mode: str, *, skip: Sequence[str] = (), device="cpu") -> list[str]:
    """Quantize `model`'s linear layers in place (`mode`: int8 | fp8 | nf4) except those `skip` matches,
    and move the model to `device`; each layer is moved before it is quantized. Returns the names of
    the quantized layers. The model must be frozen: quantized weights take no gradient."""
    names = quantizable_linears(model, skip)
    if mode in ("int8", "fp8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        wanted = set(names)
        config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
        quantize_(model, config, filter_fn=lambda module, name: name in wanted, device=device)
    elif mode == "nf4":
        _to_bnb_linear4bit(model, names)
        model.is_loaded_in_4bit = True  # what peft's LoRA dispatch reads to wrap bnb's Linear4bit
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; choose int8, fp8 or nf4")
    model.to(device)  # the layers left as they were; bitsandbytes quantizes its weights as they move
    return names


def _to_bnb_linear4bit(model: torch.nn.Module, names: list[str]) -> None:
    """Swap each named nn.Linear for a bitsandbytes NF4 `Linear4bit` holding the same (not yet quantized)
    weight; bitsandbytes quantizes it when the module moves to its device. Compute dtype: the weight's."""
    import bitsandbytes as bnb

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new.requires_grad_(False))


def text_encoder_skip(model: torch.nn.Module) -> tuple[str, ...]:
    """What a transformers text encoder keeps in full precision (its class's `_keep_in_fp32_modules`)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return tuple(p for name in keep for p in (name, f"*.{name}", f"*.{name}.*"))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters as stored: a quantized tensor counts its packed data and scales."""
    return sum(_stored_bytes(p) for p in model.parameters())


def _stored_bytes(t: torch.Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:  # torchao's tensor subclasses: the inner tensors (qdata, scale, ...)
        return sum(_stored_bytes(getattr(t, inner)) for inner in t.__tensor_flatten__()[0])
    quant_state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: packed data + absmax (+ its scale)
    extra = sum(x.numel() * x.element_size() for x in _quant_state_tensors(quant_state)) if quant_state else 0
    return t.numel() * t.element_size() + extra


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:  # double quantization: absmax quantized in turn
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]
