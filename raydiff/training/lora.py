"""Adapters as plain functions: choose target modules, inject, read, save and load them (`lora.type`: LoRA,
DoRA, LoKr, LoHa, all peft's).

Saved keys look like `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (no peft `.default.`), which is
what diffusers' `load_lora_weights` and most tools expect; LoKr and LoHa keep peft's `lokr_w1`, `hada_w1_a`, ...
"""

from __future__ import annotations

import fnmatch
import os

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from raydiff.training import adapters
from raydiff.training.lora_formats import LORA_FILE, PREFIX, import_lora, write_lora_file

__all__ = ["LORA_FILE", "adapter_info", "attach_adapter", "empty_component", "inject_lora", "key_prefix",
           "load_lora_into", "lora_state_dict", "resolve_targets", "save_lora"]

_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # what peft adapts here
_ADAPTER_PARAMS = ("lora_", "lokr_", "hada_")


def key_prefix(component: str) -> str:
    """The key prefix of a LoRA of `component` in diffusers' files. A LoRA of Wan 2.2's low-noise expert
    `transformer_2` is saved as `transformer.` keys: diffusers' `save_lora_weights` takes no transformer_2
    layers, and `load_lora_weights(..., load_into_transformer_2=True)` reads `transformer.` keys into it."""
    return "transformer" if component == "transformer_2" else component


def resolve_targets(model: torch.nn.Module, entries: list[str], *, defaults: bool = False) -> list[str]:
    """`lora.target_modules` -> peft's `target_modules`. An entry matches every layer whose path equals it or
    ends with `.<entry>` (peft's rule); an entry with `*` is a glob over whole paths, expanded here. Refused:
    an entry that matches no layer (dropped instead for a family's `defaults`, which cover all its variants:
    Wan 2.2 TI2V-5B lacks Wan 2.1 I2V's image cross-attention), and a short name that matches layers inside the
    repeated transformer blocks and also outside them (FLUX's `proj_out` is both
    `single_transformer_blocks.N.proj_out` and the final projection), which is rarely meant; a glob says which."""
    layers = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    blocks = tuple(f"{n}." for n, c in model.named_children() if isinstance(c, torch.nn.ModuleList))
    resolved, problems = [], []
    for entry in entries:
        matched = [n for n in layers if (fnmatch.fnmatchcase(n, entry) if "*" in entry
                                         else n == entry or n.endswith("." + entry))]
        outside = [n for n in matched if not n.startswith(blocks)]
        if not matched and defaults:
            continue
        if not matched:
            problems.append(f"{entry!r} matches no layer of {type(model).__name__}")
        elif "*" not in entry and outside and len(outside) < len(matched):
            inside = next(n for n in matched if n.startswith(blocks)).split(".")[0]
            problems.append(f"{entry!r} matches {len(matched) - len(outside)} layers in the transformer blocks and "
                            f"also {', '.join(outside)} outside them; write '{inside}.*.{entry}' for the blocks "
                            f"only, or '*{entry}' for all of them")
        resolved += sorted(matched) if "*" in entry else [entry]
    if problems:
        raise ValueError("lora.target_modules: " + "; ".join(problems))
    return list(dict.fromkeys(resolved))


def peft_config(adapter_type: str, *, rank: int, alpha: float, target_modules: list[str], lokr_factor: int = -1):
    """peft's config for `lora.type`; every type starts as the base model (delta W = 0)."""
    if adapter_type in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True,
                          use_dora=adapter_type == "dora")
    if adapter_type == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=target_modules, decompose_factor=lokr_factor,
                          init_weights=True)
    if adapter_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_modules, init_weights=True)
    raise ValueError(f"unknown adapter type {adapter_type!r}; choose from {tuple(adapters.PARAMS)}")


def adapter_info(config) -> dict:
    """{"type", "r", "lora_alpha"} (and "lokr_factor") of an injected peft config: what checkpoints record."""
    if isinstance(config, LoKrConfig):
        return {"type": "lokr", "r": config.r, "lora_alpha": config.alpha, "lokr_factor": config.decompose_factor}
    if isinstance(config, LoHaConfig):
        return {"type": "loha", "r": config.r, "lora_alpha": config.alpha}
    return {"type": "dora" if config.use_dora else "lora", "r": config.r, "lora_alpha": config.lora_alpha}


def inject_lora(model: torch.nn.Module, *, target_modules: list[str], rank: int, alpha: float | None,
                adapter_type: str = "lora", lokr_factor: int = -1, defaults: bool = False):
    """Add a peft adapter of `adapter_type` (the model is unchanged until trained); adapter params in fp32
    even when the frozen base is bf16, so small updates are not rounded away. `defaults`: the targets are the
    family's (resolve_targets). Returns the peft config."""
    targets = resolve_targets(model, list(target_modules), defaults=defaults)
    config = peft_config(adapter_type, rank=rank, alpha=alpha or rank, target_modules=targets,
                         lokr_factor=lokr_factor)
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {target_modules} match no module of {type(model).__name__}: "
                         f"{err}") from None
    for name, p in model.named_parameters():
        if any(marker in name for marker in _ADAPTER_PARAMS):
            p.data = p.data.float()
    return config


def lora_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Adapter weights as `{prefix}.{module path}.{peft param}`, contiguous CPU tensors."""
    sd = get_peft_model_state_dict(model)
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_lora(directory: str, state_dict: dict, config, weight_name: str = LORA_FILE, prefix: str = PREFIX) -> None:
    """Write `weight_name` (pytorch_lora_weights.safetensors) as trained (scale unfolded, so resuming is exact),
    with the peft config diffusers loads it with and raydiff's type, rank and alpha in the metadata. `prefix`:
    the keys' (`key_prefix`); a ControlNet's LoRA keeps `controlnet.`, which its diffusers model's
    `load_lora_adapter(file, prefix="controlnet")` reads."""
    os.makedirs(directory, exist_ok=True)
    write_lora_file(os.path.join(directory, weight_name), state_dict, adapter_info(config), prefix=prefix)


def _scale_factor(info: dict, want: dict, path: str) -> float:
    """What an adapter file's tensors (`info`: its type, rank, alpha) are multiplied by to compute the same delta
    W under `want`'s alpha / rank; a file of another type or rank is refused."""
    if info["type"] != want["type"]:
        raise ValueError(f"{path} holds a {info['type']} adapter, but lora.type is {want['type']}")
    if info["r"] is not None and info["r"] != want["r"]:
        raise ValueError(f"{path}: adapter rank {info['r']} does not match lora.rank {want['r']}")
    scale = info["lora_alpha"] / info["r"] if info["lora_alpha"] is not None and info["r"] else 1.0
    return scale / (want["lora_alpha"] / want["r"])


def load_lora_into(model: torch.nn.Module, path: str, prefix: str, *, family: str | None = None,
                   config=None) -> None:
    """Load an adapter file or checkpoint directory into an injected adapter, strictly. Any format of
    `registry.LORA_FORMATS` is accepted; with `config`, the file must hold the same type and rank, and a file
    trained at another alpha is rescaled so it computes the same update under this adapter's alpha / rank."""
    sd, info = import_lora(path, family=family, prefix=prefix)
    sd = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    factor = 1.0 if config is None else _scale_factor(info, adapter_info(config), path)
    if factor != 1:
        sd = adapters.flatten({m: adapters.scaled(p, factor) for m, p in adapters.by_module(sd).items()})
    try:
        result = set_peft_model_state_dict(model, sd)
    except RuntimeError as err:  # size mismatches: another rank, LoKr factor or model
        raise ValueError(f"{path}: {str(err).strip().splitlines()[-1].strip()}") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys match no adapted module, e.g. {unexpected[:3]} "
                         "(different lora.target_modules or type?)")
    expected = set(get_peft_model_state_dict(model))
    if missing := expected - set(sd):
        raise ValueError(f"{path}: missing {len(missing)} adapter keys, e.g. {sorted(missing)[:3]} "
                         "(different rank or lora.target_modules?)")


def empty_component(path: str, name: str, *, revision: str | None = None):
    """Pipeline component `name` of the diffusers-format model at `path`, built from its config on the meta
    device (no weights read); None for a component that is not a diffusers model."""
    import importlib

    from diffusers import DiffusionPipeline

    library, class_name = DiffusionPipeline.load_config(path, revision=revision)[name]
    if library != "diffusers":
        return None
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(path, subfolder=name, revision=revision))


def attach_adapter(model: torch.nn.Module, path: str, *, family: str | None, adapter_name: str,
                   scale: float = 1.0, prefix: str = PREFIX) -> None:
    """Add the adapter in `path` (any format) to `model` as peft layers named `adapter_name`, its output
    multiplied by `scale`: for what diffusers cannot load itself (LoHa, LyCORIS-named LoKr). `prefix`: the
    keys' (`controlnet` for a ControlNet's adapter)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    sd, info = import_lora(path, family=family, prefix=prefix)
    sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
    modules = adapters.by_module(sd)
    factor = info.get("lokr_factor", lokr_factor(modules) if info["type"] == "lokr" else -1)
    config = peft_config(info["type"], rank=info["r"], alpha=info["lora_alpha"] or info["r"],
                         target_modules=sorted(modules), lokr_factor=factor)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale(adapter_name, scale)


def lokr_factor(modules: dict[str, dict]) -> int:
    """The `decompose_factor` under which peft rebuilds the LoKr factor shapes of `modules` (a file without
    raydiff's metadata, such as a LyCORIS-named one): -1 or one of the first factors' sizes."""
    from peft.tuners.lokr.layer import factorization

    def shape(params, factor):  # (rows, cols) of a factor, whether stored whole or as a product
        whole = params.get(f"lokr_w{factor}")
        return tuple(whole.shape) if whole is not None else (params[f"lokr_w{factor}_a"].shape[0],
                                                              params[f"lokr_w{factor}_b"].shape[1])

    shapes = [(shape(p, 1), shape(p, 2)) for p in modules.values()]
    for candidate in [-1, *sorted({w1[0] for w1, _ in shapes} | {w1[1] for w1, _ in shapes})]:
        if all(factorization(w1[0] * w2[0], candidate) == (w1[0], w2[0]) and
               factorization(w1[1] * w2[1], candidate) == (w1[1], w2[1]) for w1, w2 in shapes):
            return candidate
    raise ValueError("no LoKr decompose_factor rebuilds these factor shapes; set lora.lokr_factor")
