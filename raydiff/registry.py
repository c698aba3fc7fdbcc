"""Model families by name: `model.family` -> the class that implements it; and the LoRA file formats' names.

Torch-free on purpose: the config validates `model.family` against these names before anything
heavy is imported. A family module is imported only when its class is asked for.

Built-in families are listed here as `module:Class` strings. `register_family(name, cls)` adds one
without editing the package (a plugin, or a test's toy family); `registered_families()` is what
the driver ships to Ray's processes (training workers, encoder actors) with the config, and
`adopt_families` installs it there, since a registration made in the driver does not reach them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

BUILTIN_FAMILIES = {
    "flux": "raydiff.pipelines.flux:FluxImagePipeline",
    "qwen_image": "raydiff.pipelines.qwen_image:QwenImagePipeline",
    "sd3": "raydiff.pipelines.sd3:SD3ImagePipeline",
    "wan": "raydiff.pipelines.wan:WanVideoPipeline",
    "z_image": "raydiff.pipelines.z_image:ZImagePipeline",
    "flux2_klein": "raydiff.pipelines.flux2:Flux2KleinImagePipeline",
    "wan_i2v": "raydiff.pipelines.wan_i2v:WanImageToVideoFamily",
    "wan_vace": "raydiff.pipelines.wan_vace:WanVACEFamily",
    "qwen_image_edit": "raydiff.pipelines.qwen_image_edit:QwenImageEditFamily",
    "qwen_image_edit_plus": "raydiff.pipelines.qwen_image_edit:QwenImageEditPlusFamily",
    "flux_kontext": "raydiff.pipelines.flux_kontext:FluxKontextFamily",
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
    # A TI2V-5B directory says WanPipeline (with expand_timesteps); its image-to-video is
    # WanImageToVideoPipeline on the same files. `Class+key`: only with that model_index.json key true.
    "wan_i2v": ("WanImageToVideoPipeline", "WanPipeline+expand_timesteps"),
    "wan_vace": ("WanVACEPipeline",),
    "qwen_image_edit": ("QwenImageEditPipeline",),
    "qwen_image_edit_plus": ("QwenImageEditPlusPipeline",),
    "flux_kontext": ("FluxKontextPipeline",),
}
# The LoRA file formats raydiff reads and `raydiff export --format` writes (raydiff.training.lora_formats
# converts them): named here so that the CLI lists them without importing torch.
LORA_FORMATS = ("diffusers", "comfyui", "kohya", "diffsynth")


@dataclass(frozen=True)
class DataKeys:
    """The metadata columns a family's units read as files (`data.data_file_keys`): exactly one of `targets`
    (what is denoised), any of `conditions`; `requires` pairs (key, the key it needs); `required`: conditions it
    cannot train without. `sampling`: the conditions its diffusers pipeline cannot sample without (validation
    takes them from `validation.images`). `max_paths`: (column, the most paths a row may list there) for columns
    that take a list (1: one path, never a list). `prompt_conditions`: conditions its prompt encoding reads (an
    image seen as vision tokens), so no image-free empty prompt can stand in for caption dropout. `flip`: whether
    `data.random_flip` may mirror its samples (not where an instruction says "move it left")."""

    targets: tuple[str, ...]
    conditions: tuple[str, ...] = ()
    requires: tuple[tuple[str, str], ...] = ()
    sampling: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    max_paths: tuple[tuple[str, int], ...] = ()
    prompt_conditions: tuple[str, ...] = ()
    flip: bool = True


_IMAGE = DataKeys(("image",))
# An image family with a ControlNet: `control_image` is the ControlNet's input (needed with model.controlnet).
_CONTROLLED_IMAGE = DataKeys(("image",), ("control_image",))
# An edit family's source image(s), `edit_image`: required, needed to sample, never flipped with its target.
EDIT_IMAGE = "edit_image"


def edit_keys(max_sources: int = 1, prompt_reads_source: bool = False) -> DataKeys:
    """The data keys of an edit family: the edited `image` and its `edit_image` source(s), up to `max_sources`."""
    return DataKeys(("image",), (EDIT_IMAGE,), sampling=(EDIT_IMAGE,), required=(EDIT_IMAGE,),
                    max_paths=((EDIT_IMAGE, max_sources),),
                    prompt_conditions=(EDIT_IMAGE,) if prompt_reads_source else (), flip=False)


# Each family class holds its own as `data_keys`; copied here so the config can check the keys torch-free
# (tests check the two agree).
BUILTIN_DATA_KEYS = {
    "flux": _CONTROLLED_IMAGE,
    "qwen_image": _CONTROLLED_IMAGE,
    "sd3": _CONTROLLED_IMAGE,
    "wan": DataKeys(("video", "image")),  # an image trains as a one-frame video
    "wan_i2v": DataKeys(("video",), ("image",), sampling=("image",)),
    "wan_vace": DataKeys(("video", "image"), ("control_video", "mask_video", "reference_images"),
                         (("mask_video", "control_video"),)),
    "z_image": _IMAGE,
    "flux2_klein": _IMAGE,
    "qwen_image_edit": edit_keys(1, prompt_reads_source=True),
    "qwen_image_edit_plus": edit_keys(3, prompt_reads_source=True),
    "flux_kontext": edit_keys(1),
}
# The diffusers ControlNet class each family trains with `model.controlnet`, and the layer counts a new one
# takes (its `from_transformer` arguments): the family classes' `controlnet_class` / `controlnet_layers`,
# copied torch-free for the config (tests check the two agree).
BUILTIN_CONTROLNETS = {
    "flux": ("FluxControlNetModel", ("num_layers", "num_single_layers")),
    "qwen_image": ("QwenImageControlNetModel", ("num_layers",)),
    "sd3": ("SD3ControlNetModel", ("num_layers",)),
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
    """The diffusers pipeline classes a directory of `family` may hold (`Class+key`: with that config key true)."""
    if family in BUILTIN_PIPELINES:
        return BUILTIN_PIPELINES[family]
    return (get_pipeline_class(family).diffusers_class.__name__,)


def holds_family(family: str, model_index: dict) -> bool:
    """Whether a directory whose model_index.json is `model_index` holds a pipeline `family` loads."""
    for entry in pipeline_class_names(family):
        name, *keys = entry.split("+")
        if model_index.get("_class_name") == name and all(model_index.get(k) for k in keys):
            return True
    return False


def family_for_pipeline(class_name: str) -> str | None:
    """The built-in family that loads a diffusers pipeline class, if any (the first, for a class two load)."""
    return next((f for f, names in BUILTIN_PIPELINES.items() if class_name in (n.split("+")[0] for n in names)), None)


def data_keys(family: str) -> DataKeys:
    """What `family` reads from the metadata (imports a registered family's class, never a built-in)."""
    if family in BUILTIN_DATA_KEYS:
        return BUILTIN_DATA_KEYS[family]
    return get_pipeline_class(family).data_keys


# Columns every family reads: `mask`, a grayscale image weighting the loss (white trained, black ignored).
LOSS_KEYS = ("mask",)
def controlnet_of(family: str) -> tuple[str, tuple[str, ...]] | None:
    """(diffusers ControlNet class name, a new one's layer-count keys) of `family`, None if it has no ControlNet
    (imports a registered family's class, never a built-in)."""
    if family in BUILTIN_FAMILIES:
        return BUILTIN_CONTROLNETS.get(family)
    cls = get_pipeline_class(family)
    return (cls.controlnet_class.__name__, cls.controlnet_layers) if cls.controlnet_class is not None else None


def controlnet_families() -> list[str]:
    return [f for f in family_names() if controlnet_of(f) is not None]


def data_keys_problem(family: str, keys: list[str]) -> str | None:
    """Why `data.data_file_keys` = `keys` cannot feed `family`'s units; None if they can."""
    spec = data_keys(family)
    for key in keys:
        if key not in spec.targets + spec.conditions + LOSS_KEYS:
            optional = [*spec.conditions, *LOSS_KEYS]
            known = " or ".join(spec.targets) + f" and optionally {', '.join(optional)}"
            return f"{family} does not read {key!r}; its units read {known}"
    targets = [k for k in keys if k in spec.targets]
    if len(targets) != 1:
        found = f"found {targets}" if targets else "none is listed"
        return f"{family} trains on exactly one of {list(spec.targets)}; {found}"
    for key, needed in spec.requires:
        if key in keys and needed not in keys:
            return f"{key!r} needs {needed!r} as well"
    if missing := [k for k in spec.required if k not in keys]:
        return f"{family} trains on {', '.join(map(repr, missing))} as well; add it (e.g. {[*keys, *missing]})"
    return None


def registered_families() -> dict[str, str | type]:
    """The families registered in this process (not the built-ins), to ship to Ray's processes."""
    return dict(_registered)


def adopt_families(families: dict[str, str | type]) -> None:
    """Install families registered in the driver (`registered_families()` there) in this process."""
    for name, target in families.items():
        _registered.setdefault(name, target)
