"""Model families by name: `model.family` -> the class that implements it.

Torch-free on purpose: the config validates `model.family` against these names before anything
heavy is imported. A family module is imported only when its class is asked for.

Built-in families are listed here as `module:Class` strings. `register_family(name, cls)` adds one
without editing the package (a plugin, or a test's toy family); `registered_families()` is what
the driver ships to Ray's processes (training workers, encoder actors) with the config, and
`adopt_families` installs it there, since a registration made in the driver does not reach them.
"""

from __future__ import annotations

import importlib

BUILTIN_FAMILIES = {
    "flux": "raydiff.pipelines.flux:FluxImagePipeline",
    "qwen_image": "raydiff.pipelines.qwen_image:QwenImagePipeline",
    "sd3": "raydiff.pipelines.sd3:SD3ImagePipeline",
    "wan": "raydiff.pipelines.wan:WanVideoPipeline",
    "z_image": "raydiff.pipelines.z_image:ZImagePipeline",
    "flux2_klein": "raydiff.pipelines.flux2:Flux2KleinImagePipeline",
}
# The diffusers pipeline class each built-in family loads (model_index.json's `_class_name`), so the
# driver can check a model directory before importing any family (tests check these match the classes).
BUILTIN_PIPELINES = {
    "flux": ("FluxPipeline",),
    "qwen_image": ("QwenImagePipeline",),
    "sd3": ("StableDiffusion3Pipeline",),
    "wan": ("WanPipeline",),
    "z_image": ("ZImagePipeline",),
    "flux2_klein": ("Flux2KleinPipeline",),
}
_registered: dict[str, str | type] = {}


def register_family(name: str, target: str | type) -> None:
    """Make `name` a valid `model.family`: `target` is a family class or its `module:Class` path."""
    if name in BUILTIN_FAMILIES:
        raise ValueError(f"{name!r} is a built-in family; register yours under another name")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"family target {target!r} must be 'module:Class'")
    _registered[name] = target


def family_names() -> list[str]:
    return [*BUILTIN_FAMILIES, *_registered]


def get_pipeline_class(family: str) -> type:
    """The class of `family` (imports its module)."""
    target = _registered.get(family, BUILTIN_FAMILIES.get(family))
    if target is None:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(family_names())}")
    if isinstance(target, type):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def pipeline_class_names(family: str) -> tuple[str, ...]:
    """The diffusers pipeline class names a directory of `family` may hold."""
    if family in BUILTIN_PIPELINES:
        return BUILTIN_PIPELINES[family]
    return (get_pipeline_class(family).diffusers_class.__name__,)


def family_for_pipeline(class_name: str) -> str | None:
    """The built-in family that loads a diffusers pipeline class, if any."""
    return next((f for f, names in BUILTIN_PIPELINES.items() if class_name in names), None)


def registered_families() -> dict[str, str | type]:
    """The families registered in this process (not the built-ins), to ship to Ray's processes."""
    return dict(_registered)


def adopt_families(families: dict[str, str | type]) -> None:
    """Install families registered in the driver (`registered_families()` there) in this process."""
    for name, target in families.items():
        _registered.setdefault(name, target)
