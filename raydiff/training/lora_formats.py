"""LoRA key formats: export raydiff's adapters for diffusers, ComfyUI, kohya and DiffSynth, import any of them.

raydiff's own form ("diffusers") keys each adapted module m in diffusers naming with peft's parameter names
(`raydiff.training.adapters`): `transformer.m.lora_A.weight`, `transformer.m.lokr_w1`, ... On disk, for
m = "transformer_blocks.0.attn.to_q" and o its name in the family's original checkpoints:

  diffusers  transformer.m.<param>; the peft config (r, alpha, ...) in the safetensors metadata
  comfyui    lora: diffusion_model.o.lora_down/lora_up.weight (FLUX) or .lora_A/lora_B.weight (Qwen-Image,
             Z-Image, FLUX.2, Wan), .alpha (not for FLUX.2, whose diffusers loader refuses alpha keys)
             lokr, loha: LyCORIS naming, lycoris_<m, "." -> "_">.lokr_w1 / .hada_w1_a ..., .alpha
  kohya      lora_unet_<o, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
  diffsynth  m.lora_A.default.weight / .lora_B.default.weight (Qwen-Image); FLUX: the kohya layout, which
             DiffSynth-Studio's FLUX loader maps onto its fused modules (diffsynth/utils/lora/flux.py); Wan:
             o.lora_A.default.weight, the official names its Wan DiT keeps (diffsynth/utils/lora/general.py)

Every exported file has its scale alpha / r folded into its weights and alpha = rank wherever an alpha is
written (adapters.py): DiffSynth takes one global alpha from the first `.alpha` key it meets, ComfyUI and
DiffSynth ignore the metadata alpha of a diffusers file, ComfyUI and LyCORIS apply a full-factor LoKr at scale 1;
at scale 1 they all compute the delta W trained. Checkpoints keep the trained weights unfolded, alpha in the
metadata, so that resuming is exact.

FLUX's original (BFL) names fuse projections: double_blocks.N.img_attn.qkv = to_q|to_k|to_v and
single_blocks.N.linear1 = to_q|to_k|to_v|proj_mlp. A fused LoRA stacks the parts' A (rank n*r) and puts
their B on a block diagonal, so it is exactly the sum of the parts. Untrained parts are zeros. A Kronecker or
Hadamard product does not fuse that way, hence LyCORIS naming (diffusers' module names, which ComfyUI maps onto
the fused weights itself) for LoKr and LoHa. Each family holds its table of original names
(`lora_original_names`; Qwen-Image's and Z-Image's are diffusers'; Wan's are the official checkpoints'
`blocks.N.self_attn.q`, which ComfyUI's WanModel keeps, and a Wan 2.2 low-noise expert's LoRA exports like
any other), its ComfyUI suffixes and alpha keys
(`comfyui_lora_suffixes`, `comfyui_lora_alpha`) and what DiffSynth reads (`diffsynth_lora_format`,
`diffsynth_lora_names`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from raydiff.registry import LORA_FORMATS, family_names, get_pipeline_class
from raydiff.training import adapters, model_card

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, which load_lora_weights looks for
PREFIX = "transformer"  # every family's dit_name, the diffusers key prefix
METADATA_KEY = "lora_adapter_metadata"  # diffusers': the peft config it builds the adapter from
ADAPTER_KEY = "raydiff_adapter"  # raydiff's: type, rank, alpha (and the LoKr factor)
LYCORIS = "lycoris_"  # LyCORIS's module prefix, which ComfyUI maps for FLUX and Qwen-Image
_RENAMES = ((".lora_down.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_B.weight"),
            (".default.weight", ".weight"))


def _normalized(key: str) -> str:
    """kohya's lora_down/up as lora_A/B, peft's `.default` adapter name dropped."""
    for old, new in _RENAMES:
        if key.endswith(old):
            return key[:-len(old)] + new
    return key.removesuffix(".default")


def _is_adapter_key(key: str) -> bool:
    try:
        adapters.split_key(_normalized(key))
    except ValueError:
        return False
    return True


def detect_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict, from its key names."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", LYCORIS)) for k in keys):
        return "comfyui"
    if any(k.startswith(PREFIX + ".") for k in keys):
        return "diffusers"
    if any(_is_adapter_key(k) for k in keys):
        return "diffsynth"
    raise ValueError(f"not a LoRA in any of {LORA_FORMATS}: keys like {keys[:3]}")


@functools.cache
def _pattern(template: str, sep: str) -> re.Pattern:
    return re.compile(re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)"))


def _fill(template: str, match: re.Match) -> str:
    return template.format(i=match.group(1) if match.groups() else None)


def _family_attr(family: str | None, attr: str):
    return getattr(get_pipeline_class(family), attr) if family in family_names() else None


def _table(family: str | None, fmt: str) -> dict:
    """The family's original module names, for the formats that use them."""
    table = _family_attr(family, "lora_original_names")
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


def _lycoris_module(table: dict, name: str) -> str:
    """`transformer_blocks_0_attn_to_q` -> `transformer_blocks.0.attn.to_q`, by the family's diffusers names."""
    for parts, _ in table.values():
        for part in parts:
            if m := _pattern(part, "_").fullmatch(name):
                return _fill(part, m)
    raise ValueError(f"unknown LyCORIS module name {LYCORIS + name!r}")


def _diffsynth_module(family: str | None, name: str) -> dict[str, str] | None:
    """DiffSynth's own name of a fused module (FLUX: `blocks.0.attn.a_to_qkv`) -> its original name, or None.
    A family whose DiffSynth DiT keeps the original names (Wan: `blocks.0.self_attn.q`) maps each to itself."""
    if _family_attr(family, "diffsynth_lora_format") == "original":
        return name
    for ours, orig in (_family_attr(family, "diffsynth_lora_names") or {}).items():
        if m := _pattern(ours, ".").fullmatch(name):
            return _fill(orig, m)
    return None


def _fuse(pairs: list, mults: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts' (A, B) or None -> one LoRA of the fused layer: A stacked, B block-diagonal."""
    if mults is None:
        return pairs[0]
    a0 = next(p for p in pairs if p is not None)[0]
    r, d = a0.shape
    downs = [p[0] if p is not None else a0.new_zeros(r, d) for p in pairs]
    ups = [p[1] if p is not None else a0.new_zeros(k * d, r) for p, k in zip(pairs, mults)]
    return torch.cat(downs), torch.block_diag(*ups)


def _split(params: dict, scale: float, parts: tuple[str, ...], mults: tuple | None) -> dict[str, tuple[dict, float]]:
    """The inverse of `_fuse`, dropping all-zero parts. A fused LoRA that is not block-diagonal (trained
    on the fused layer elsewhere) gives every part the shared A and its rows of B, as diffusers does."""
    if mults is None:
        return {parts[0]: (params, scale)}
    if set(params) != {"lora_A.weight", "lora_B.weight"}:
        raise ValueError(f"a {adapters.type_of(params)} adapter on a fused layer cannot be split into {parts}")
    down, up = params["lora_A.weight"], params["lora_B.weight"]
    n, (rank, d) = len(parts), down.shape
    dims = [k * d for k in mults]
    if sum(dims) != up.shape[0]:
        raise ValueError(f"fused LoRA for {parts} has {up.shape[0]} output rows, expected {sum(dims)}")
    rows, r = up.split(dims), rank // n
    sparse = rank % n == 0 and all(not blk.any() for j, row in enumerate(rows)
                                   for k, blk in enumerate(row.split(r, dim=1)) if j != k)
    if not sparse:
        return {p: ({"lora_A.weight": down.clone(), "lora_B.weight": row.contiguous()}, scale)
                for p, row in zip(parts, rows)}
    out = {}
    for j, (part, a, row) in enumerate(zip(parts, down.split(r), rows)):
        b = row[:, j * r:(j + 1) * r]
        if a.any() or b.any():  # the same scale: B_j A_j is the fused product's j-th diagonal block
            out[part] = ({"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()}, scale)
    return out


def _bfl_format(modules: dict[str, dict], fmt: str, family: str) -> dict[str, torch.Tensor]:
    """Folded LoRA modules in the family's original names (kohya, or ComfyUI's for `comfyui`), alpha = rank."""
    table = _table(family, fmt)
    groups = {orig: (parts, mults) for orig, parts, mults in (_original_of(table, m) for m in modules)}
    cls = get_pipeline_class(family)
    down_key, up_key = ("lora_down", "lora_up") if fmt == "kohya" else cls.comfyui_lora_suffixes
    with_alpha = fmt == "kohya" or cls.comfyui_lora_alpha
    out = {}
    for orig, (parts, mults) in groups.items():
        pairs = [(modules[p]["lora_A.weight"], modules[p]["lora_B.weight"]) if p in modules else None for p in parts]
        down, up = _fuse(pairs, mults)
        name = "lora_unet_" + orig.replace(".", "_") if fmt == "kohya" else "diffusion_model." + orig
        out[f"{name}.{down_key}.weight"], out[f"{name}.{up_key}.weight"] = down.contiguous(), up.contiguous()
        if with_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _lycoris_format(modules: dict[str, dict], family: str, rank: int | None) -> dict[str, torch.Tensor]:
    """Folded LoKr/LoHa modules in LyCORIS naming, alpha = each module's rank (its scale is then 1)."""
    table = _table(family, "comfyui")
    out = {}
    for module, params in modules.items():
        _original_of(table, module)  # only modules this format's import maps back
        name = LYCORIS + module.replace(".", "_")
        out |= {f"{name}.{p}": t.contiguous() for p, t in params.items()}
        out[f"{name}.alpha"] = torch.tensor(float(adapters.module_rank(params) or rank or 1))
    return out


def common_rank(modules: dict[str, dict]) -> int | None:
    """The one rank of all modules (None: LoKr modules of full factors only); several ranks are refused."""
    ranks = {adapters.module_rank(p) for p in modules.values()} - {None}
    if len(ranks) > 1:
        raise ValueError(f"LoRA modules have ranks {sorted(ranks)}; raydiff trains a single rank")
    return ranks.pop() if ranks else None


def _check_format_name(fmt: str) -> None:
    """A ValueError naming the choices for a format name that `LORA_FORMATS` lacks."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {LORA_FORMATS}")


def to_format(state_dict: dict[str, torch.Tensor], fmt: str, *, family: str | None, alpha: float | None,
              rank: int | None = None) -> dict:
    """raydiff's form (`transformer.<module>.<param>`, scale alpha / rank; `rank` defaults to the modules')
    -> `fmt`'s keys, with the scale folded into the weights and alpha = rank wherever an alpha is written."""
    _check_format_name(fmt)
    modules = adapters.by_module({k[len(PREFIX) + 1:]: v for k, v in state_dict.items()})
    kind = adapters.type_of(p for params in modules.values() for p in params)
    adapters.check_format(kind, fmt)
    rank = rank or common_rank(modules)
    scale = alpha / rank if alpha is not None and rank else 1.0
    modules = {m: adapters.scaled(params, scale) for m, params in modules.items()}
    if fmt == "diffsynth":
        if family is None:
            raise ValueError("diffsynth LoRA layouts differ by family (pass family=...)")
        fmt = _family_attr(family, "diffsynth_lora_format") or "diffsynth"
    if fmt == "diffusers":
        return {f"{PREFIX}.{k}": v for k, v in adapters.flatten(modules).items()}
    if fmt == "diffsynth":
        return {f"{m}.{p.replace('.weight', '.default.weight')}": t for m, ps in modules.items() for p, t in ps.items()}
    if fmt == "original":  # DiffSynth's Wan DiT keeps the official names; the scale is folded, so no alpha keys
        return {k.removeprefix("diffusion_model.").replace(".weight", ".default.weight"): t
                for k, t in _bfl_format(modules, "comfyui", family).items() if not k.endswith(".alpha")}
    if kind in ("lokr", "loha"):
        return _lycoris_format(modules, family, rank)
    return _bfl_format(modules, fmt, family)


def _entries(state_dict: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """{name in `fmt`'s naming (LyCORIS names keep their prefix): {param or "alpha": tensor}}."""
    prefix = {"diffusers": PREFIX + ".", "comfyui": "diffusion_model.", "kohya": "lora_unet_", "diffsynth": ""}[fmt]
    entries: dict[str, dict] = {}
    for key, t in state_dict.items():
        if fmt == "comfyui" and key.startswith(LYCORIS):
            rest = key
        elif key.startswith(prefix):
            rest = key[len(prefix):]
        else:
            raise ValueError(f"unsupported key {key!r} in a {fmt} LoRA")
        rest = _normalized(rest)
        try:
            name, param = (rest[:-len(".alpha")], "alpha") if rest.endswith(".alpha") else adapters.split_key(rest)
        except ValueError:
            raise ValueError(f"unsupported key {key!r} in a {fmt} LoRA (kohya DoRA `dora_scale` keys included: "
                             f"DoRA imports in diffusers/peft format only)") from None
        entries.setdefault(name, {})[param] = t
    return entries


def _modules(entries: dict, fmt: str, family: str | None, metadata: dict) -> dict[str, tuple[dict, float]]:
    """Each entry as diffusers modules with their own scale (fused LoRAs split)."""
    modules = {}
    for name, params in entries.items():
        alpha = params.pop("alpha").item() if "alpha" in params else None
        if adapters.type_of(params) in ("lora", "dora") and not {"lora_A.weight", "lora_B.weight"} <= set(params):
            raise ValueError(f"{fmt} LoRA module {name!r} lacks its {'B' if 'lora_A.weight' in params else 'A'} "
                             f"weight")
        if fmt == "diffusers":  # peft's rule: alpha / r for every module, from the file's metadata
            rank = metadata.get("r") or adapters.module_rank(params)
            alpha = metadata.get("lora_alpha") or rank
            modules[name] = (params, alpha / rank if rank else 1.0)
            continue
        scale = adapters.lycoris_scale(params, alpha)  # LyCORIS's rule, which ComfyUI, kohya, DiffSynth share
        if name.startswith(LYCORIS):
            modules[_lycoris_module(_table(family, fmt), name[len(LYCORIS):])] = (params, scale)
        elif fmt == "diffsynth" and (orig := _diffsynth_module(family, name)) is None:
            modules[name] = (params, scale)  # diffusers' module names, as DiffSynth's Qwen-Image DiT has
        else:
            parts, mults = _parts_of(_table(family, fmt), orig if fmt == "diffsynth" else name,
                                     "_" if fmt == "kohya" else ".")
            modules.update(_split(params, scale, parts, mults))
    return modules


def from_format(state_dict: dict[str, torch.Tensor], *, family: str | None,
                metadata: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Any format -> (raydiff's form, {"type", "r", "lora_alpha"}). `metadata` (a diffusers file's, see
    `read_metadata`) gives r and alpha where the keys carry none. When all modules share one scale it stays
    alpha / r; otherwise each module's scale is folded into its weights and alpha = r."""
    fmt, metadata = detect_format(state_dict), metadata or {}
    modules = _modules(_entries(state_dict, fmt), fmt, family, metadata)
    kind = adapters.type_of(p for params, _ in modules.values() for p in params)
    rank = common_rank({m: params for m, (params, _) in modules.items()}) or metadata.get("r")
    scales = {scale for _, scale in modules.values()}
    if len(scales) == 1 and rank:
        sd, alpha = adapters.flatten({m: p for m, (p, _) in modules.items()}), scales.pop() * rank
    else:
        sd, alpha = adapters.flatten({m: adapters.scaled(p, s) for m, (p, s) in modules.items()}), rank
    alpha = int(alpha) if alpha is not None and float(alpha).is_integer() else alpha
    info = {"type": kind, "r": rank, "lora_alpha": alpha}
    if metadata.get("lokr_factor") is not None:
        info["lokr_factor"] = metadata["lokr_factor"]
    return {f"{PREFIX}.{k}": v for k, v in sd.items()}, info


def peft_kwargs(info: dict, target_modules: list[str]) -> dict | None:
    """The peft config (LoraConfig, LoKrConfig or LoHaConfig keyword arguments) that diffusers' loaders build the
    adapter from; None for a LoKr whose factor is unknown (diffusers then infers it from the shapes)."""
    kind, r, alpha = info["type"], info["r"], info["lora_alpha"] or info["r"]
    if kind in ("lora", "dora"):
        return {"r": r, "lora_alpha": alpha, "target_modules": target_modules, **({"use_dora": True} if
                                                                                   kind == "dora" else {})}
    if kind == "lokr" and info.get("lokr_factor") is None:
        return None
    factor = {"decompose_factor": info["lokr_factor"]} if kind == "lokr" else {}
    return {"r": r, "alpha": alpha, "target_modules": target_modules, **factor}


def write_lora_file(path: str, state_dict: dict[str, torch.Tensor], info: dict, prefix: str = PREFIX) -> None:
    """A file in raydiff's form, with the peft config for diffusers and {"type", "r", "alpha"} for raydiff.
    `prefix`: the keys' and the peft config's (`controlnet` for a ControlNet's adapter)."""
    targets = sorted(adapters.by_module({k[len(prefix) + 1:]: v for k, v in state_dict.items()}))
    metadata = {"format": "pt", ADAPTER_KEY: json.dumps({k: v for k, v in info.items() if v is not None})}
    if (kwargs := peft_kwargs(info, targets)) is not None:
        metadata[METADATA_KEY] = json.dumps({f"{prefix}.{k}": v for k, v in kwargs.items()}, sort_keys=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=metadata)


def read_metadata(path: str, prefix: str = PREFIX) -> dict:
    """{"r", "lora_alpha", "lokr_factor", "type"} from a diffusers-format file's metadata, where present."""
    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    peft = {k.removeprefix(prefix + "."): v for k, v in json.loads(raw.get(METADATA_KEY, "{}")).items()}
    ours = json.loads(raw.get(ADAPTER_KEY, "{}"))
    out = {"r": peft.get("r"), "lora_alpha": peft.get("lora_alpha", peft.get("alpha")),
           "lokr_factor": peft.get("decompose_factor")}
    return {k: v for k, v in {**out, **ours}.items() if v is not None}


def lora_file(path: str) -> str:
    return os.path.join(path, LORA_FILE) if os.path.isdir(path) else path


def family_of(checkpoint: str) -> str | None:
    """The family from the run's config.yaml beside the LoRA (raydiff checkpoints carry one), else None."""
    directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    config = os.path.join(directory, "config.yaml")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        return (yaml.safe_load(f).get("model") or {}).get("family", "flux")  # flux is the config default


def import_lora(path: str, *, family: str | None, prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file (or checkpoint directory) in any of LORA_FORMATS -> (raydiff's form: `transformer.<module>.<param>`,
    {"type", "r", "lora_alpha"}). `family` maps ComfyUI, kohya and DiffSynth-FLUX names; diffusers files need
    none. Another `prefix` (`controlnet`): that model's adapter, in diffusers format only (as raydiff saves it),
    returned under its own prefix."""
    path = lora_file(path)
    try:
        state_dict = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    if prefix != PREFIX:  # read as a transformer's, which has the same diffusers layout under another prefix
        if not state_dict or any(not k.startswith(prefix + ".") for k in state_dict):
            raise ValueError(f"{path}: not an adapter of the {prefix} (keys like {list(state_dict)[:2]})")
        renamed = {PREFIX + k[len(prefix):]: v for k, v in state_dict.items()}
        sd, info = from_format(renamed, family=family, metadata=read_metadata(path, prefix))
        return {prefix + k[len(PREFIX):]: v for k, v in sd.items()}, info
    metadata = read_metadata(path) if detect_format(state_dict) == "diffusers" else None
    return from_format(state_dict, family=family, metadata=metadata)


def export_lora(checkpoint: str, fmt: str, out: str, *, family: str | None = None) -> str:
    """Write the adapter of `checkpoint` (a checkpoint directory or a .safetensors file in any format) to the
    file `out` in format `fmt`, scale folded in (module docstring), with a model card (README.md) beside it.
    The family (needed for every format but diffusers) defaults to the checkpoint's config.yaml. Returns `out`."""
    _check_format_name(fmt)  # before the checkpoint is read
    family = family or family_of(checkpoint)  # None is fine where no names need mapping
    state_dict, info = import_lora(checkpoint, family=family)
    exported = to_format(state_dict, fmt, family=family, alpha=info["lora_alpha"], rank=info["r"])
    if out_dir := os.path.dirname(out):
        os.makedirs(out_dir, exist_ok=True)
    if fmt == "diffusers":
        write_lora_file(out, exported, {**info, "lora_alpha": info["r"]})
    else:
        save_file(exported, out, metadata={"format": "pt"})
    facts = model_card.export_facts(checkpoint, {**info, "lora_alpha": info["r"]}, family)
    model_card.write_card(os.path.dirname(os.path.abspath(out)), facts, weights=os.path.basename(out), fmt=fmt)
    return out
