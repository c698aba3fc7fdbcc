"""The optional libraries that settings import in Ray's processes, and hiding the unused ones.

peft and transformers import bitsandbytes and torchao at import time whenever they are installed (the
`recipes` extra installs both): about 1 s of every training worker's and encoder actor's start, which
a run that quantizes nothing and trains with plain AdamW never uses (docs/performance.md section 1,
"Time to the first optimizer step").
"""

from __future__ import annotations

import glob
import json
import os
import sys

# (setting, value) -> (the module it imports, the pip package that provides it)
LIBRARIES = {("model.quantize", "int8"): ("torchao", "torchao"), ("model.quantize", "fp8"): ("torchao", "torchao"),
             ("model.quantize", "nf4"): ("bitsandbytes", "bitsandbytes"),
             ("train.optimizer", "adamw8bit"): ("bitsandbytes", "bitsandbytes"),
             ("train.optimizer", "adafactor"): ("transformers", "transformers"),
             ("train.optimizer", "prodigy"): ("prodigyopt", "prodigyopt")}
# Imported eagerly by peft and transformers, used by raydiff only for the settings above.
EAGER_OPTIONAL = ("bitsandbytes", "torchao")


def libraries_used(cfg) -> list[tuple[str, str, str, str]]:
    """(setting, its value, the module it imports, the pip package) for each setting of `cfg` that needs one,
    e.g. ("train.optimizer", "adamw8bit", "bitsandbytes", "bitsandbytes")."""
    settings = (("model.quantize", cfg.model.quantize), ("train.optimizer", cfg.train.optimizer))
    return [(setting, value, *LIBRARIES[setting, value]) for setting, value in settings
            if (setting, value) in LIBRARIES]


def prequantized(model_path: str, revision: str | None = None) -> bool | None:
    """Whether a component of the pipeline at `model_path` (a directory, or a hub id in the local cache) ships
    a `quantization_config`: diffusers and transformers load such a checkpoint through bitsandbytes or torchao
    whatever raydiff's settings say. None when the pipeline is not on this machine."""
    root = model_path
    if not os.path.isdir(model_path):
        from huggingface_hub import try_to_load_from_cache

        try:
            index = try_to_load_from_cache(model_path, "model_index.json", revision=revision)
        except ValueError:  # not a hub id either: the driver's model check names the mistake
            return None
        if not isinstance(index, str):
            return None
        root = os.path.dirname(index)
    for config in glob.glob(os.path.join(root, "*", "config.json")):
        try:
            with open(config) as f:
                if "quantization_config" in json.load(f):
                    return True
        except (OSError, ValueError):
            continue
    return False


def hide_unused_libraries(cfg) -> list[str]:
    """Make bitsandbytes and torchao look absent to later imports in this process when `cfg` uses neither
    and its model is not pre-quantized (or not yet on this machine): `sys.modules[name] = None` makes
    `importlib.util.find_spec` answer None, which is how peft and transformers decide. Only for a process
    that serves this one run (a training worker, an encoder actor), before peft, transformers or diffusers
    are imported; a module already imported stays. Returns the names hidden."""
    if prequantized(cfg.model.path, cfg.model.revision) is not False:
        return []
    # diffusers, transformers and peft note at import whether the libraries are installed, and import them later
    # on that note: in a Ray worker process reused after a task that imported one of them, hiding now breaks it.
    if any(name in sys.modules for name in ("diffusers", "transformers", "peft")):
        return []
    used = {module for _, _, module, _ in libraries_used(cfg)}
    hidden = [name for name in EAGER_OPTIONAL if name not in used and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    return hidden
