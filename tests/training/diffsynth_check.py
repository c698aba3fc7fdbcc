"""A one-off check, not part of the suite: raydiff's LoRA exports through DiffSynth-Studio's own loaders (FLUX's,
and the general one Qwen-Image and Wan use).

DiffSynth-Studio needs torchvision, which does not install next to raydiff's CPU torch, so this runs in two
virtualenvs:

    python tests/training/diffsynth_check.py write DIR   # in raydiff's venv: tiny FLUX, Qwen-Image, Wan,
                                                         # trained-like LoRAs at alpha = 2 x rank, their
                                                         # exports, the expected delta W per DiffSynth layer
    python tests/training/diffsynth_check.py check DIR   # in a venv with `pip install torch==2.14.1
                                                         # torchvision==0.29.1 diffsynth`

`check` loads each export with the loader's `convert_state_dict` (`FluxLoRALoader` for FLUX, `GeneralLoRALoader`
for the others), computes what its `fuse_lora_to_base_model` adds to each layer (up @ down, `pipe.load_lora`'s
alpha 1), checks that every layer is a module of DiffSynth's DiT (`FluxDiT`, `QwenImageDiT`, Wan 2.1 1.3B's
`WanModel`, built on the meta device), and compares the deltas with the expected ones. It prints a JSON report
and exits 1 on a mismatch. Last run: 2026-12-05, diffsynth 2.1.12: FLUX 13 layers, Qwen-Image 26, Wan 26, every
delta equal (max |diff| 0.0).

It also compares each family's training timestep grid (1000 σ) and DiffSynth loss weights
(`train.sigma_weighting: diffsynth`) with DiffSynth's `FlowMatchScheduler(template).set_timesteps(1000,
training=True)`: FLUX.1, Wan, Qwen-Image (default μ and the dynamic shift at 1024 and 4096 tokens), FLUX.2,
Z-Image. Last run: every σ within 1.2e-7, every weight within 1.1e-6 (float32 rounding).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

# family, DiffSynth's scheduler template, image tokens for a dynamic shift (None: the default)
SCHEDULES = [("flux", "FLUX.1", None), ("wan", "Wan", None), ("qwen_image", "Qwen-Image", None),
             ("qwen_image", "Qwen-Image", 1024), ("qwen_image", "Qwen-Image", 4096), ("flux2_klein", "FLUX.2", None),
             ("z_image", "Z-Image", None)]
# family -> the export formats DiffSynth-Studio loads (README: Adapter files for other tools)
FORMATS = {"flux": ("diffsynth", "diffusers"), "qwen_image": ("diffsynth", "comfyui"), "wan": ("diffsynth",)}


def write(out: str) -> None:
    sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import foreign_loaders
    import test_wan_lora_formats
    from test_lora_formats import RANK, WHOLE_BLOCKS, Trained

    from raydiff.registry import get_pipeline_class
    from raydiff.training.lora_formats import export_lora

    for family, formats in FORMATS.items():
        model, lora_dir = f"{out}/tiny-{family}", f"{out}/lora-{family}"
        get_pipeline_class(family).write_tiny(model)
        if family == "wan":  # every linear layer ComfyUI names; DiffSynth's WanModel keeps the same names
            _, _, _, state, targets = test_wan_lora_formats.train(family, model, lora_dir)
            scale = test_wan_lora_formats.ALPHA / test_wan_lora_formats.RANK
            deltas = {test_wan_lora_formats.comfy_name(m): scale * state[f"transformer.{m}.lora_B.weight"]
                      @ state[f"transformer.{m}.lora_A.weight"] for m in targets}
        else:
            deltas = Trained(family, model, lora_dir, WHOLE_BLOCKS[family], 2 * RANK).deltas()  # per diffusers module
        for fmt in formats:
            export_lora(lora_dir, fmt, f"{out}/{family}-{fmt}.safetensors", family=family)
        if family == "flux":  # as DiffSynth's names and fused layers hold it
            deltas = foreign_loaders.diffsynth_flux_deltas(
                {f"transformer.{m}.lora_{ab}.weight": w for m, d in deltas.items()
                 for ab, w in (("A", torch.eye(d.shape[1])), ("B", d))})
        save_file({k: v.contiguous() for k, v in deltas.items()}, f"{out}/{family}-expected.safetensors")
    write_schedules(out)


def write_schedules(out: str) -> None:
    from raydiff.diffusion.flow_matching import diffsynth_weight
    from raydiff.registry import get_pipeline_class

    grids = {}
    for family, template, tokens in SCHEDULES:
        schedule = get_pipeline_class(family).schedule
        mu = {} if tokens is None else {"mu": schedule.dynamic.mu(tokens)}
        grid = schedule.grid(**mu)
        grids[f"{template}-{tokens}-sigmas"] = grid.float()
        grids[f"{template}-{tokens}-weights"] = diffsynth_weight(grid, schedule, **mu)
    save_file(grids, f"{out}/schedules.safetensors")


def check(out: str) -> bool:
    """Both checks against the installed diffsynth; prints the report, returns whether everything agreed."""
    report: dict = {}
    ok = check_loras(out, report) & check_schedules(out, report)
    print(json.dumps(report, indent=1))
    return ok


def check_loras(out: str, report: dict) -> bool:
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.utils.lora.flux import FluxLoRALoader
    from diffsynth.utils.lora.general import GeneralLoRALoader

    wan_1_3b = {"dim": 1536, "in_dim": 16, "ffn_dim": 8960, "out_dim": 16, "text_dim": 4096, "freq_dim": 256,
                "eps": 1e-6, "patch_size": (1, 2, 2), "num_heads": 12, "num_layers": 30, "has_image_input": False}
    dits = {"flux": FluxDiT, "qwen_image": QwenImageDiT, "wan": lambda: WanModel(**wan_1_3b)}
    ok = True
    for family, formats in FORMATS.items():
        loader = FluxLoRALoader if family == "flux" else GeneralLoRALoader
        with torch.device("meta"):
            modules = {name for name, _ in dits[family]().named_modules()}
        expected = load_file(f"{out}/{family}-expected.safetensors")
        for fmt in formats:
            converted = loader().convert_state_dict(load_file(f"{out}/{family}-{fmt}.safetensors"))
            layers = {k[:-len(".lora_B.weight")] for k in converted if k.endswith(".lora_B.weight")}
            missing, same = sorted(layers - modules), layers == set(expected)
            diff = max((converted[m + ".lora_B.weight"] @ converted[m + ".lora_A.weight"] - expected[m]).abs().max()
                       .item() for m in layers) if same else None
            report[f"{family} {fmt}"] = {"layers": len(layers), "not_in_dit": missing, "same_layers": same,
                                         "max_abs_diff": diff}
            ok = ok and not missing and same and diff < 1e-5
    return ok


def check_schedules(out: str, report: dict) -> bool:
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    ours, ok = load_file(f"{out}/schedules.safetensors"), True
    for _, template, tokens in SCHEDULES:
        scheduler = FlowMatchScheduler(template)
        scheduler.set_timesteps(1000, training=True, **({} if tokens is None else {"dynamic_shift_len": tokens}))
        key = f"{template}-{tokens}"
        sigma = (ours[key + "-sigmas"] - scheduler.sigmas.float()).abs().max().item()
        weight = (ours[key + "-weights"] - scheduler.linear_timesteps_weights.float()).abs().max().item()
        report[f"schedule {key}"] = {"max_abs_diff_sigma": sigma, "max_abs_diff_weight": weight}
        ok = ok and sigma < 1e-6 and weight < 1e-5
    return ok


if __name__ == "__main__":
    command, directory = sys.argv[1], os.path.abspath(sys.argv[2])
    if command == "write":
        write(directory)
    elif not check(directory):
        sys.exit(1)
