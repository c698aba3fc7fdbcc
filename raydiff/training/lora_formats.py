"""LoRA key formats: export raydiff's diffusers-format LoRAs for ComfyUI, kohya and DiffSynth, import any of them.

A LoRA is, per module m in diffusers naming, A (r, in) and B (out, r) with delta W = alpha / r * B @ A.
On disk, for m = "transformer_blocks.0.attn.to_q" and o its name in the family's original checkpoints:

  diffusers  transformer.m.lora_A.weight / .lora_B.weight; r and alpha in the safetensors metadata
  comfyui    diffusion_model.o.lora_down.weight / .lora_up.weight / .alpha     (FLUX)
             diffusion_model.o.lora_A.weight / .lora_B.weight / .alpha         (Qwen-Image, Z-Image, Wan)
             diffusion_model.o.lora_A.weight / .lora_B.weight, alpha / r in B  (FLUX.2)
  kohya      lora_unet_<o, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
  diffsynth  m.lora_A.default.weight / .lora_B.default.weight, alpha / r baked into B

FLUX's original (BFL) names fuse projections: double_blocks.N.img_attn.qkv = to_q|to_k|to_v and
single_blocks.N.linear1 = to_q|to_k|to_v|proj_mlp. A fused LoRA stacks the parts' A (rank n*r) and puts
their B on a block diagonal, so it is exactly the sum of the parts; alpha x n keeps alpha / r.
Untrained parts are zeros. Each family holds its table of original names (`lora_original_names`), its
ComfyUI suffixes (`comfyui_lora_suffixes`) and whether its ComfyUI files carry alpha keys
(`comfyui_lora_alpha`); Qwen-Image's and Z-Image's original names are diffusers'. Wan's are the official
checkpoints' (blocks.N.self_attn.q, ...), which ComfyUI's WanModel keeps; a Wan 2.2 low-noise expert's LoRA
exports like any other (ComfyUI loads it onto the low-noise model).

ComfyUI reads lora_A and lora_down alike; FLUX uses lora_down because diffusers' FLUX loader only
converts `diffusion_model.` keys on its kohya path, which it enters on `.lora_down.weight`. Only
diffusers files carry `lora_adapter_metadata`: the other loaders scale by the alpha keys (or by 1),
so metadata would make diffusers scale twice. DiffSynth saves peft's keys as they are (`.default.`
kept, alpha = r) and adds B @ A unscaled, hence the baked scale.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Iterable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raydiff.registry import family_names, get_pipeline_class

FORMATS = ("diffusers", "comfyui", "kohya", "diffsynth")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, which load_lora_weights looks for
PREFIX = "transformer"  # every family's dit_name, the diffusers key prefix
METADATA_KEY = "lora_adapter_metadata"

_KEY = re.compile(r"(?P<name>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|alpha)")


def detect_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict, from its key names."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(PREFIX + ".") for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffsynth"
    raise ValueError(f"not a LoRA in any of {FORMATS}: keys like {keys[:3]}")


@functools.cache
def _pattern(template: str, sep: str) -> re.Pattern:
    return re.compile(re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)"))


def _fill(template: str, match: re.Match) -> str:
    return template.format(i=match.group(1) if match.groups() else None)


def _table(family: str | None, fmt: str) -> dict:
    """The family's original module names, for the formats that use them."""
    table = get_pipeline_class(family).lora_original_names if family in family_names() else None
    if table is None:
        known = sorted(f for f in family_names() if get_pipeline_class(f).lora_original_names is not None)
        raise ValueError(f"{fmt} LoRA names are known for families {known}; got {family!r}"
                         + (" (pass family=...)" if family is None else ""))
    return table


def _original_of(table: dict, module: str) -> tuple[str, tuple[str, ...], tuple | None]:
    for orig, (parts, mults) in table.items():
        for part in parts:
            if m := _pattern(part, ".").fullmatch(module):
                return _fill(orig, m), tuple(_fill(p, m) for p in parts), mults
    raise ValueError(f"LoRA module {module!r} has no known original name; it can be exported as diffusers only")


def _parts_of(table: dict, name: str, sep: str) -> tuple[tuple[str, ...], tuple | None]:
    for orig, (parts, mults) in table.items():
        if m := _pattern(orig, sep).fullmatch(name):
            return tuple(_fill(p, m) for p in parts), mults
    raise ValueError(f"unknown original module name {name!r}")


def _modules(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Diffusers keys -> {module: (A, B)}."""
    out = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) + 1:-len(".lora_A.weight")]
            out[module] = (a, state_dict[key.replace(".lora_A.", ".lora_B.")])
    return out


def _fuse(pairs: list, mults: tuple | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Parts' (A, B) or None -> one LoRA of the fused layer: A stacked, B block-diagonal, alpha x n."""
    if mults is None:
        return pairs[0][0], pairs[0][1], alpha
    a0 = next(p for p in pairs if p is not None)[0]
    r, d = a0.shape
    downs = [p[0] if p is not None else a0.new_zeros(r, d) for p in pairs]
    ups = [p[1] if p is not None else a0.new_zeros(k * d, r) for p, k in zip(pairs, mults)]
    return torch.cat(downs), torch.block_diag(*ups), alpha * len(pairs)


def _split(down, up, alpha: float, parts: tuple[str, ...], mults: tuple | None) -> dict[str, tuple]:
    """The inverse of `_fuse`, dropping all-zero parts. A fused LoRA that is not block-diagonal (trained
    on the fused layer elsewhere) gives every part the shared A and its rows of B, as diffusers does."""
    if mults is None:
        return {parts[0]: (down, up, alpha)}
    n, (rank, d) = len(parts), down.shape
    dims = [k * d for k in mults]
    if sum(dims) != up.shape[0]:
        raise ValueError(f"fused LoRA for {parts} has {up.shape[0]} output rows, expected {sum(dims)}")
    rows, r = up.split(dims), rank // n
    sparse = rank % n == 0 and all(not blk.any() for j, row in enumerate(rows)
                                   for k, blk in enumerate(row.split(r, dim=1)) if j != k)
    if not sparse:
        return {p: (down.clone(), row.contiguous(), alpha) for p, row in zip(parts, rows)}
    out = {}
    for j, (part, a, row) in enumerate(zip(parts, down.split(r), rows)):
        b = row[:, j * r:(j + 1) * r]
        if a.any() or b.any():
            out[part] = (a.contiguous(), b.contiguous(), alpha / n)
    return out


def to_format(state_dict: dict[str, torch.Tensor], fmt: str, *, family: str | None, alpha: float) -> dict:
    """A diffusers-format LoRA state dict (`transformer.<module>.lora_A.weight`, scale alpha / r) -> `fmt`'s keys."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {FORMATS}")
    if fmt == "diffusers":
        return dict(state_dict)
    table, modules = _table(family, fmt), _modules(state_dict)
    if fmt == "diffsynth":
        return {k: v for m, (a, b) in modules.items() for k, v in (
            (f"{m}.lora_A.default.weight", a), (f"{m}.lora_B.default.weight", b * (alpha / a.shape[0])))}
    groups = {orig: (parts, mults) for orig, parts, mults in (_original_of(table, m) for m in modules)}
    cls = get_pipeline_class(family)
    down_key, up_key = ("lora_down", "lora_up") if fmt == "kohya" else cls.comfyui_lora_suffixes
    with_alpha = fmt == "kohya" or cls.comfyui_lora_alpha
    out = {}
    for orig, (parts, mults) in groups.items():
        down, up, a = _fuse([modules.get(p) for p in parts], mults, alpha)
        name = "lora_unet_" + orig.replace(".", "_") if fmt == "kohya" else "diffusion_model." + orig
        if not with_alpha:  # read back with scale 1
            up = up * (a / down.shape[0])
        out[f"{name}.{down_key}.weight"], out[f"{name}.{up_key}.weight"] = down.contiguous(), up.contiguous()
        if with_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(a))
    return out


def from_format(state_dict: dict[str, torch.Tensor], *, family: str | None,
                alpha: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Any format -> (diffusers-format state dict, {"r", "lora_alpha"}). `alpha` applies where the file has
    no alpha keys (default: the rank). Modules whose alphas differ get their scale baked into B."""
    fmt = detect_format(state_dict)
    prefix = {"diffusers": PREFIX + ".", "comfyui": "diffusion_model.", "kohya": "lora_unet_", "diffsynth": ""}[fmt]
    entries: dict[str, dict] = {}
    for key, t in state_dict.items():
        m = _KEY.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if m is None:
            raise ValueError(f"unsupported key {key!r} in a {fmt} LoRA")
        kind = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B", None: "alpha"}[m["kind"]]
        entries.setdefault(m["name"], {})[kind] = t
    modules = {}
    for name, e in entries.items():
        if "A" not in e or "B" not in e:
            raise ValueError(f"{fmt} LoRA module {name!r} lacks its {'B' if 'A' in e else 'A'} weight")
        a = e["alpha"].item() if "alpha" in e else (alpha if alpha is not None else e["A"].shape[0])
        if fmt in ("diffusers", "diffsynth"):
            modules[name] = (e["A"], e["B"], a)
        else:
            parts, mults = _parts_of(_table(family, fmt), name, "_" if fmt == "kohya" else ".")
            modules.update(_split(e["A"], e["B"], a, parts, mults))
    ranks = {a.shape[0] for a, _, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules have ranks {sorted(ranks)}; raydiff trains a single rank")
    rank = ranks.pop()
    alphas = {float(a) for _, _, a in modules.values()}
    common = alphas.pop() if len(alphas) == 1 else None
    sd = {}
    for m, (a, b, al) in modules.items():
        sd[f"{PREFIX}.{m}.lora_A.weight"] = a
        sd[f"{PREFIX}.{m}.lora_B.weight"] = b if common is not None else b * (float(al) / rank)
    common = rank if common is None else common
    return sd, {"r": rank, "lora_alpha": int(common) if float(common).is_integer() else common}


def _lora_file(path: str) -> str:
    return os.path.join(path, LORA_FILE) if os.path.isdir(path) else path


def _saved_metadata(path: str) -> dict:
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata.get(METADATA_KEY, "{}"))


def write_diffusers_lora(path: str, state_dict: dict, prefix: str, rank: int, alpha: float,
                         targets: list[str]) -> None:
    """A diffusers-format LoRA file: `{prefix}.<module>.lora_A.weight` keys, rank, alpha and targets in the
    metadata under the same prefix (as diffusers' `save_lora_weights` writes them)."""
    info = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": targets}
    save_file(state_dict, path, metadata={"format": "pt", METADATA_KEY: json.dumps(info)})


def _own_prefix(path: str, state_dict: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA of another model than the transformer (a ControlNet's), as raydiff saves it: diffusers keys
    under `prefix`, rank and alpha in the metadata."""
    if not state_dict or any(not k.startswith(prefix + ".") for k in state_dict):
        raise ValueError(f"{path}: not a LoRA of the {prefix} (keys like {list(state_dict)[:2]})")
    meta, ranks = _saved_metadata(path), {v.shape[0] for k, v in state_dict.items() if ".lora_A." in k}
    rank = meta.get(f"{prefix}.r", ranks.pop() if len(ranks) == 1 else None)
    return state_dict, {"r": rank, "lora_alpha": meta.get(f"{prefix}.lora_alpha", rank)}


def _family_of(checkpoint: str) -> str | None:
    """The family from the run's config.yaml beside the LoRA (raydiff checkpoints carry one), else None."""
    directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    config = os.path.join(directory, "config.yaml")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        return (yaml.safe_load(f).get("model") or {}).get("family", "flux")  # flux is the config default


def import_lora(path: str, *, family: str | None, prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file (or checkpoint directory) in any of FORMATS -> (diffusers-format state dict with keys
    `transformer.<module>.lora_A.weight` / `.lora_B.weight`, {"r": rank, "lora_alpha": alpha}). `family`
    maps ComfyUI / kohya names; diffusers and DiffSynth files need none. Another `prefix` (`controlnet`):
    that model's diffusers-format LoRA, as raydiff saves it."""
    path = _lora_file(path)
    state_dict = load_file(path)
    if prefix != PREFIX:
        return _own_prefix(path, state_dict, prefix)
    alpha = _saved_metadata(path).get(f"{PREFIX}.lora_alpha") if detect_format(state_dict) == "diffusers" else None
    return from_format(state_dict, family=family, alpha=alpha)


def export_lora(checkpoint: str, fmt: str, out: str, *, family: str | None = None) -> str:
    """Write the LoRA of `checkpoint` (a checkpoint directory or a .safetensors file in any format) to the
    file `out` in format `fmt`. The family (needed for every format but diffusers) defaults to the
    checkpoint's config.yaml. Returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {FORMATS}")
    src = _lora_file(checkpoint)
    with safe_open(src, "pt") as f:
        source_fmt = detect_format(f.keys())
    if out_dir := os.path.dirname(out):
        os.makedirs(out_dir, exist_ok=True)
    if fmt == source_fmt == "diffusers":
        shutil.copyfile(src, out)  # as stored, metadata included
        return out
    family = family or _family_of(checkpoint)  # None is fine where no names need mapping
    state_dict, info = import_lora(src, family=family)
    if fmt == "diffusers":
        write_diffusers_lora(out, state_dict, PREFIX, info["r"], info["lora_alpha"], sorted(_modules(state_dict)))
        return out
    save_file(to_format(state_dict, fmt, family=family, alpha=info["lora_alpha"]), out, metadata={"format": "pt"})
    return out
