"""Other tools' LoRA loaders, transcribed, so tests can compute the delta W each would apply from one of our files.
ComfyUI and DiffSynth-Studio do not install next to raydiff's pins; these follow their code (cited per function)
and share nothing with raydiff's own conversions. Strength/alpha arguments are each tool's defaults (1).
"""

from __future__ import annotations

import math

import torch

# --- ComfyUI ---------------------------------------------------------------------------------------------------


def comfyui_flux_key_map(depth: int, depth_single: int, hidden: int) -> dict[str, tuple[str, tuple | None]]:
    """comfy/lora.py model_lora_keys_unet for a Flux model, restricted to the transformer blocks' weights: LoRA
    key prefix -> (target weight, (dim, start, size) or None). The diffusers names and their offsets into BFL's
    fused weights are comfy/utils.py flux_to_diffusers (weights only); BFL names map as `lora_unet_<name _>` and
    as themselves ("generic lora format")."""
    diffusers: dict[str, tuple[str, tuple | None]] = {}
    for i in range(depth):
        to = f"diffusion_model.double_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            diffusers[f"transformer_blocks.{i}.attn.{part}"] = (f"{to}.img_attn.qkv.weight", (0, j * hidden, hidden))
        for j, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            diffusers[f"transformer_blocks.{i}.attn.{part}"] = (f"{to}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for d, b in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                     ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                     ("ff_context.net.2", "txt_mlp.2")):
            diffusers[f"transformer_blocks.{i}.{d}"] = (f"{to}.{b}.weight", None)
    for i in range(depth_single):
        to = f"diffusion_model.single_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            diffusers[f"single_transformer_blocks.{i}.attn.{part}"] = (f"{to}.linear1.weight", (0, j * hidden, hidden))
        diffusers[f"single_transformer_blocks.{i}.proj_mlp"] = (f"{to}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        diffusers[f"single_transformer_blocks.{i}.norm.linear"] = (f"{to}.modulation.lin.weight", None)
        diffusers[f"single_transformer_blocks.{i}.proj_out"] = (f"{to}.linear2.weight", None)
    key_map = {}
    for weight in {to for to, _ in diffusers.values()}:
        name = weight[len("diffusion_model."):-len(".weight")]
        key_map["lora_unet_" + name.replace(".", "_")] = (weight, None)
        key_map["diffusion_model." + name] = (weight, None)
    for d, to in diffusers.items():
        key_map["transformer." + d] = to  # "regular diffusers flux lora format"
        key_map["lycoris_" + d.replace(".", "_")] = to  # "simpletrainer lycoris"
    return key_map


def comfyui_qwen_key_map(layers: list[str]) -> dict[str, tuple[str, None]]:
    """comfy/lora.py model_lora_keys_unet for QwenImage: each weight by its own name, `transformer.` prefixed,
    `lycoris_`, `diffusion_model.` (generic) and `lora_unet_`."""
    key_map = {}
    for name in layers:
        to = (f"diffusion_model.{name}.weight", None)
        for key in (name, f"transformer.{name}", "lycoris_" + name.replace(".", "_"), f"diffusion_model.{name}",
                    "lora_unet_" + name.replace(".", "_")):
            key_map[key] = to
    return key_map


def _comfyui_patch(lora: dict, x: str, loaded: set):
    """comfy/lora.py load_lora for one key prefix `x` (LoRA names of comfy/weight_adapter/lora.py LoRAAdapter.load,
    LoHaAdapter.load, LoKrAdapter.load): (kind, tensors, alpha) or None."""
    alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
    if f"{x}.alpha" in lora:
        loaded.add(f"{x}.alpha")
    for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
                     ("lora_B.default.weight", "lora_A.default.weight")):
        if f"{x}.{up}" in lora:
            loaded |= {f"{x}.{up}", f"{x}.{down}"}
            return "lora", (lora[f"{x}.{up}"], lora[f"{x}.{down}"]), alpha
    if f"{x}.hada_w1_a" in lora:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        loaded |= {f"{x}.{n}" for n in names}
        return "loha", tuple(lora[f"{x}.{n}"] for n in names), alpha
    names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
    found = {n: lora.get(f"{x}.{n}") for n in names}
    if any(v is not None for v in found.values()):
        loaded |= {f"{x}.{n}" for n, v in found.items() if v is not None}
        return "lokr", tuple(found[n] for n in names), alpha
    return None


def _comfyui_diff(kind: str, w: tuple, alpha: float | None) -> torch.Tensor:
    """calculate_weight's delta at strength 1: comfy/weight_adapter/lora.py (alpha / mat2.shape[0], else 1),
    loha.py (alpha / w1b.shape[0]), lokr.py (alpha / dim, dim = the rank of a rebuilt factor; 1 without one)."""
    if kind == "lora":
        up, down = w
        return (alpha / down.shape[0] if alpha is not None else 1.0) * (up @ down)
    if kind == "loha":
        w1a, w1b, w2a, w2b = w
        return (alpha / w1b.shape[0] if alpha is not None else 1.0) * ((w1a @ w1b) * (w2a @ w2b))
    w1, w2, w1_a, w1_b, w2_a, w2_b = w
    dim = None
    if w1 is None:
        dim, w1 = w1_b.shape[0], w1_a @ w1_b
    if w2 is None:
        dim, w2 = w2_b.shape[0], w2_a @ w2_b
    return (alpha / dim if alpha is not None and dim is not None else 1.0) * torch.kron(w1, w2)


def comfyui_deltas(lora: dict, key_map: dict) -> tuple[dict, set]:
    """{(target weight, offset): delta W} ComfyUI applies, and the keys it does not load ("lora key not loaded")."""
    deltas, loaded = {}, set()
    for x, (target, offset) in key_map.items():
        patch = _comfyui_patch(lora, x, loaded)
        if patch is not None:
            deltas[(target, offset)] = _comfyui_diff(*patch)
    return deltas, set(lora) - loaded


# --- DiffSynth-Studio ------------------------------------------------------------------------------------------
# diffsynth/utils/lora/flux.py FluxLoRALoader.convert_state_dict and diffsynth/utils/lora/general.py
# GeneralLoRALoader (get_name_dict, convert_state_dict, fuse_lora_to_base_model), as pipe.load_lora calls them.

_FLUX_CIVITAI = {  # FluxLoRALoader.civitai_rename_dict, per block: kohya middle -> DiffSynth module
    "double": {"img_mod_lin": "norm1_a.linear", "txt_mod_lin": "norm1_b.linear", "img_attn_qkv": "attn.a_to_qkv",
               "txt_attn_qkv": "attn.b_to_qkv", "img_attn_proj": "attn.a_to_out", "txt_attn_proj": "attn.b_to_out",
               "img_mlp_0": "ff_a.0", "img_mlp_2": "ff_a.2", "txt_mlp_0": "ff_b.0", "txt_mlp_2": "ff_b.2"},
    "single": {"modulation_lin": "norm.linear", "linear1": "to_qkv_mlp", "linear2": "proj_out"},
}
_FLUX_DIFFUSERS = {  # FluxLoRALoader.diffusers_rename_dict, per block: diffusers module -> DiffSynth module
    "transformer_blocks": {"attn.add_k_proj": "attn.b_to_k", "attn.add_q_proj": "attn.b_to_q",
                           "attn.add_v_proj": "attn.b_to_v", "attn.to_add_out": "attn.b_to_out",
                           "attn.to_k": "attn.a_to_k", "attn.to_out.0": "attn.a_to_out", "attn.to_q": "attn.a_to_q",
                           "attn.to_v": "attn.a_to_v", "ff.net.0.proj": "ff_a.0", "ff.net.2": "ff_a.2",
                           "ff_context.net.0.proj": "ff_b.0", "ff_context.net.2": "ff_b.2",
                           "norm1.linear": "norm1_a.linear", "norm1_context.linear": "norm1_b.linear"},
    "single_transformer_blocks": {"attn.to_k": "a_to_k", "attn.to_q": "a_to_q", "attn.to_v": "a_to_v",
                                  "norm.linear": "norm.linear", "proj_mlp": "proj_in_besides_attn",
                                  "proj_out": "proj_out"},
}


def _diffsynth_flux_name(key: str) -> str | None:
    """The DiffSynth name of one key (convert_state_dict's guess_block_id + rename dicts), None if unmapped."""
    for suffix, ours in ((".lora_down.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_B.weight")):
        if key.startswith("lora_unet_") and key.endswith(suffix):
            head, block, middle = key[len("lora_unet_"):-len(suffix)].partition("_blocks_")
            i, _, middle = middle.partition("_")
            kind = head if head in _FLUX_CIVITAI else None
            module = _FLUX_CIVITAI.get(kind, {}).get(middle)
            prefix = {"double": "blocks", "single": "single_blocks"}.get(kind)
            return f"{prefix}.{i}.{module}{ours}" if module else None
    if key.startswith("transformer."):
        blocks, i, rest = key[len("transformer."):].split(".", 2)
        module, _, param = rest.rpartition(".lora_")
        target = _FLUX_DIFFUSERS.get(blocks, {}).get(module)
        prefix = {"transformer_blocks": "blocks", "single_transformer_blocks": "single_blocks"}[blocks]
        return f"{prefix}.{i}.{target}.lora_{param}" if target else None
    return None


def _block_diag_fuse(sd: dict, name: str, parts: list[str], fused: str, extra: str | None = None) -> None:
    """convert_state_dict's qkv (and single blocks' mlp) fusion: A stacked, B block-diagonal; a missing mlp part
    is zeros (A: rank rows; B: 4x the part's rows)."""
    a_keys = [name.replace(parts[0], p) + ".lora_A.weight" for p in parts]
    b_keys = [name.replace(parts[0], p) + ".lora_B.weight" for p in parts]
    downs, ups = [sd.pop(k) for k in a_keys], [sd.pop(k) for k in b_keys]
    if extra is not None:
        mlp_a, mlp_b = sd.pop(extra + ".lora_A.weight", None), sd.pop(extra + ".lora_B.weight", None)
        downs.append(mlp_a if mlp_a is not None else torch.zeros_like(downs[0]))
        ups.append(mlp_b if mlp_b is not None else torch.zeros(4 * ups[0].shape[0], ups[0].shape[1]))
    sd[fused + ".lora_A.weight"], sd[fused + ".lora_B.weight"] = torch.cat(downs), torch.block_diag(*ups)


def diffsynth_flux_deltas(lora: dict) -> dict[str, torch.Tensor]:
    """{DiffSynth FLUX module: delta W} of pipe.load_lora(pipe.dit, file): FluxLoRALoader.convert_state_dict
    (resource from the first `lora_unet_`/`transformer.` key; one global alpha from the first `.alpha` key, as
    sqrt(alpha / rank) on every tensor; renames; diffusers qkv fusion), then fuse_lora_to_base_model's
    `alpha * up @ down` with alpha = 1."""
    alpha = 1.0
    for key, value in lora.items():
        if key.endswith(".alpha"):
            for suffix in (".lora_down.weight", ".lora_A.weight"):
                if key.replace(".alpha", suffix) in lora:
                    alpha = math.sqrt(value.item() / lora[key.replace(".alpha", suffix)].shape[0])
                    break
            else:
                continue
            break
    sd = {}
    for key, value in lora.items():
        name = _diffsynth_flux_name(key)
        if name is not None:
            sd[name] = value * alpha
    for name in [k for k in sd if k.startswith("single_blocks.") and ".a_to_q." in k and k.endswith("A.weight")]:
        base = name[:-len(".lora_A.weight")]
        _block_diag_fuse(sd, base, [".a_to_q", ".a_to_k", ".a_to_v"], base.replace(".a_to_q", ".to_qkv_mlp"),
                         base.replace(".a_to_q", ".proj_in_besides_attn"))
    for c in ("a", "b"):
        for name in [k for k in sd if f".{c}_to_q." in k and k.endswith("A.weight")]:
            base = name[:-len(".lora_A.weight")]
            _block_diag_fuse(sd, base, [f".{c}_to_q", f".{c}_to_k", f".{c}_to_v"], base.replace(f".{c}_to_q",
                                                                                             f".{c}_to_qkv"))
    return {k[:-len(".lora_B.weight")]: sd[k] @ sd[k.replace(".lora_B.", ".lora_A.")]
            for k in sd if k.endswith(".lora_B.weight")}


def diffsynth_general_deltas(lora: dict) -> dict[str, torch.Tensor]:
    """{module: delta W} of GeneralLoRALoader (Qwen-Image and other DiffSynth pipelines): get_name_dict (a
    `diffusion_model` first component dropped, `.default` dropped), A multiplied by alpha / rank where an `.alpha`
    key exists, then fuse_lora_to_base_model's `up @ down`."""
    out = {}
    for key in lora:
        up_name, down_name = ("lora_up", "lora_down") if ".lora_up." in key else ("lora_B", "lora_A")
        if up_name not in key:
            continue
        parts = key.split(".")
        if len(parts) > parts.index(up_name) + 2:
            parts.pop(parts.index(up_name) + 1)
        parts.pop(parts.index(up_name))
        if parts[0] == "diffusion_model":
            parts.pop(0)
        target = ".".join(parts[:-1])
        down = lora[key.replace(up_name, down_name)]
        alpha_key = key.replace(up_name + ".weight", "alpha").replace(up_name + ".default.weight", "alpha")
        if alpha_key != key and alpha_key in lora:
            down = down * (lora[alpha_key] / down.shape[0])
        out[target] = lora[key] @ down
    return out


# --- checks built on them --------------------------------------------------------------------------------------

def delta_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module: delta W} of every active peft adapter layer (LoRA, LoKr, LoHa), from peft's own layers."""
    with torch.no_grad():
        return {name: m.get_delta_weight(m.active_adapters[0]) for name, m in model.named_modules()
                if hasattr(m, "get_delta_weight") and m.active_adapters}


def comfyui_key_map(family: str, dit: torch.nn.Module) -> dict:
    """ComfyUI's key map for the model `dit` is (diffusers' module names; adapted layers count as theirs)."""
    if family == "flux":
        c = dit.config
        return comfyui_flux_key_map(c.num_layers, c.num_single_layers, c.num_attention_heads * c.attention_head_dim)
    return comfyui_qwen_key_map([n.removesuffix(".base_layer") for n, m in dit.named_modules()
                                 if isinstance(m, torch.nn.Linear)])


def assert_comfyui_applies(family: str, dit: torch.nn.Module, path: str, trained_deltas: dict) -> None:
    """ComfyUI loads every key of `path` and adds, to each (slice of a) weight, the trained module's delta W;
    rows of a fused weight that no trained module covers stay unchanged."""
    from safetensors.torch import load_file

    key_map = comfyui_key_map(family, dit)
    patches, not_loaded = comfyui_deltas(load_file(path), key_map)
    assert patches and not not_loaded, not_loaded
    for (target, offset), delta in patches.items():
        covered = torch.zeros(delta.shape[0], dtype=torch.bool)
        for module, ours in trained_deltas.items():
            to, part = key_map["transformer." + module]
            if to != target or offset not in (None, part):  # a patch on one part holds that part's delta only
                continue
            rows = slice(0, delta.shape[0]) if part in (None, offset) else slice(part[1], part[1] + part[2])
            torch.testing.assert_close(delta[rows], ours, atol=1e-6, rtol=1e-5)
            covered[rows] = True
        assert covered.any(), target
        assert not delta[~covered].any(), target
