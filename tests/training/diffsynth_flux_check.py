"""A one-off check, not part of the suite: raydiff's FLUX LoRA exports through DiffSynth-Studio's own FLUX loader.

DiffSynth-Studio needs torchvision, which does not install next to raydiff's CPU torch, so this runs in two
virtualenvs:

    python tests/training/diffsynth_flux_check.py write DIR   # raydiff's venv: tiny FLUX, a trained-like LoRA
                                                             # at alpha = 2 x rank, its exports, the expected
                                                             # delta W per DiffSynth module
    python tests/training/diffsynth_flux_check.py check DIR  # a venv with `pip install torch==2.14.1
                                                             # torchvision==0.29.1 diffsynth`

`check` loads each export with `diffsynth.utils.lora.flux.FluxLoRALoader.convert_state_dict`, computes what its
`fuse_lora_to_base_model` adds to each layer (up @ down, `pipe.load_lora`'s alpha 1), checks that every layer
is a module of DiffSynth's `FluxDiT`, and compares the deltas with the expected ones. It prints a JSON report and
exits 1 on a mismatch. Last run: 2026-12-05, diffsynth 2.1.12: 13 layers, every delta equal (max |diff| 0.0).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

FORMATS = ("diffsynth", "diffusers")


def write(out: str) -> None:
    sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import foreign_loaders
    from test_lora_formats import RANK, WHOLE_BLOCKS, Trained

    from raydiff.registry import get_pipeline_class
    from raydiff.training.lora_formats import export_lora

    get_pipeline_class("flux").write_tiny(f"{out}/tiny-flux")
    trained = Trained("flux", f"{out}/tiny-flux", f"{out}/lora", WHOLE_BLOCKS["flux"], 2 * RANK)
    for fmt in FORMATS:
        export_lora(trained.lora_dir, fmt, f"{out}/{fmt}.safetensors", family="flux")
    # The trained delta W of each diffusers module, as DiffSynth's names and fused layers hold it.
    expected = foreign_loaders.diffsynth_flux_deltas(
        {f"transformer.{m}.lora_{ab}.weight": w for m, d in trained.deltas().items()
         for ab, w in (("A", torch.eye(d.shape[1])), ("B", d))})
    save_file({k: v.contiguous() for k, v in expected.items()}, f"{out}/expected_deltas.safetensors")


def check(out: str) -> bool:
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.utils.lora.flux import FluxLoRALoader

    with torch.device("meta"):
        modules = {name for name, _ in FluxDiT().named_modules()}
    expected = load_file(f"{out}/expected_deltas.safetensors")
    report, ok = {}, True
    for fmt in FORMATS:
        converted = FluxLoRALoader().convert_state_dict(load_file(f"{out}/{fmt}.safetensors"))
        layers = {k[:-len(".lora_B.weight")] for k in converted if k.endswith(".lora_B.weight")}
        missing = sorted(layers - modules)
        same = layers == set(expected)
        diff = max((converted[m + ".lora_B.weight"] @ converted[m + ".lora_A.weight"] - expected[m]).abs().max().item()
                   for m in layers) if same else None
        report[fmt] = {"layers": len(layers), "not_in_FluxDiT": missing, "same_layers": same, "max_abs_diff": diff}
        ok = ok and not missing and same and diff < 1e-5
    print(json.dumps(report, indent=1))
    return ok


if __name__ == "__main__":
    command, directory = sys.argv[1], os.path.abspath(sys.argv[2])
    if command == "write":
        write(directory)
    elif not check(directory):
        sys.exit(1)
