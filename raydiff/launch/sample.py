"""`raydiff sample`: one image from a base model plus a trained LoRA (or fully fine-tuned weights),
with plain diffusers.

The adapter is loaded the way any diffusers user would load it (`load_lora_weights` on the family's
pipeline; `load_lora_adapter` on its transformer for LoKr), so a checkpoint that samples here loads everywhere
diffusers does. LoHa, which diffusers cannot load, goes in as peft's own layers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from raydiff.console import say

if TYPE_CHECKING:
    import torch

ADAPTER = "raydiff"


def sample(model: str, lora: str | None, prompt: str, out: str, *, family: str = "flux", lora_scale: float = 1.0,
           steps: int = 20, guidance: float = 3.5, height: int = 512, width: int = 512, seed: int = 0,
           num_frames: int = 1, dtype: str | None = None, device: str | None = None, expert: str | None = None,
           conditions: dict | None = None, controlnet: str | None = None) -> str:
    """Render `prompt` with `model` (a diffusers-format directory or hub id) and the LoRA at `lora` (a
    checkpoint directory or a `.safetensors` file; None = the base model) scaled by `lora_scale`, and
    save a PNG to `out` (video families: the first frame). Returns `out`.

    `device` defaults to CUDA when available; `dtype` to bfloat16 on CUDA and float32 on CPU. The
    starting noise comes from a CPU generator seeded with `seed`, as in validation samples. `expert`: the
    two-expert model's expert the LoRA was trained on (`low` loads it into `transformer_2`). `conditions`:
    condition files by data key (`image` for wan_i2v; `control_video`, `mask_video`, `reference_images` (a
    list) for wan_vace; `control_image` with `controlnet`); a control video sets the frame count. `controlnet`:
    a ControlNet run's checkpoint or a diffusers ControlNet (folder or hub id), sampled with the family's
    ControlNet pipeline.
    """
    import torch  # here: `raydiff --help` and every command's parser import this module

    from raydiff.pipelines.base import DTYPES
    from raydiff.registry import get_pipeline_class
    from raydiff.training.checkpoint import FULL_WEIGHTS_FILE
    from raydiff.training.validation import ValidationSettings, sample_images

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    family_cls = get_pipeline_class(family)
    pipe = family_cls.load_diffusers(model, dtype=DTYPES[dtype])
    if lora is not None and os.path.isfile(os.path.join(lora, FULL_WEIGHTS_FILE)):
        load_full_weights(pipe, os.path.join(lora, FULL_WEIGHTS_FILE))  # a full fine-tuning checkpoint
    elif lora is not None:
        if not os.path.exists(lora):
            raise FileNotFoundError(f"no LoRA checkpoint or file at {lora}")
        load_adapter(pipe, lora, family, lora_scale, expert)
    if controlnet is not None:
        pipe = with_trained_controlnet(family_cls, pipe, controlnet, DTYPES[dtype])
    pipe.to(device)
    # A control video brings its own length: all its frames (4k + 1), or at most --num-frames when set above 1.
    loaded = load_conditions(conditions or {}, num_frames if num_frames > 1 else 1_000_000)
    if "control_video" in loaded:
        num_frames = len(loaded["control_video"])
    settings = ValidationSettings(prompts=[prompt], seed=seed, steps=steps, guidance=guidance, height=height,
                                  width=width, num_frames=num_frames)
    control = {"control_image": loaded.pop("control_image")} if "control_image" in loaded else {}
    call_kwargs = {**family_cls.sampling_conditions(loaded), **control}  # the ControlNet pipelines' own keyword
    image = sample_images(family_cls, pipe, settings, call_kwargs=call_kwargs)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image.save(out)
    return out


def with_trained_controlnet(family_cls, pipe, controlnet: str, dtype: torch.dtype):
    """`pipe` as the family's diffusers ControlNet pipeline holding `controlnet`: a ControlNet run's checkpoint
    (its trained ControlNet, an adapter fused in) or a diffusers ControlNet folder or hub id."""
    from raydiff.pipelines.controlnet import with_controlnet
    from raydiff.training.checkpoint import controlnet_of_checkpoint, load_trained_controlnet

    if controlnet_of_checkpoint(controlnet) is not None:
        model = load_trained_controlnet(controlnet, dtype)
    else:
        model = family_cls.controlnet_class.from_pretrained(controlnet, dtype=dtype)
    return with_controlnet(family_cls, pipe, model)


def load_conditions(paths: dict, num_frames: int) -> dict:
    """Condition files by data key -> PIL images as diffusers pipelines take them: an image, a video's first
    `num_frames` frames (4k + 1) as a list, a list of images for `reference_images` and `edit_image`."""
    from PIL import Image

    from raydiff.data.decode import IMAGE_LIST_KEYS, NATIVE_KEYS, VIDEO_KEYS
    from raydiff.data.operators import DecodeError, load_image, load_video

    out = {}
    for key, path in paths.items():
        try:
            if key in VIDEO_KEYS:
                out[key] = [Image.fromarray(f) for f in load_video(path, num_frames=num_frames)]
            elif key in IMAGE_LIST_KEYS or key in NATIVE_KEYS:
                out[key] = [Image.fromarray(load_image(p)) for p in ([path] if isinstance(path, str) else path)]
            else:
                out[key] = Image.fromarray(load_image(path))
        except DecodeError as err:
            raise DecodeError(f"{path}: {err}") from None
    return out
def load_adapter(pipe, lora: str, family: str, scale: float, expert: str | None = None) -> None:
    """Load the adapter file or checkpoint `lora` into `pipe`'s transformer (`transformer_2` for a Wan 2.2
    low-noise expert's), its output scaled by `scale`: LoRA and DoRA with `load_lora_weights`, LoKr with the
    transformer's `load_lora_adapter` (what diffusers users call), LoHa and LyCORIS-named files as peft layers
    (diffusers loads neither)."""
    from safetensors import safe_open

    from raydiff.training.adapters import type_of
    from raydiff.training.lora import attach_adapter
    from raydiff.training.lora_formats import PREFIX, detect_format, lora_file

    path = lora_file(lora)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    kind, (location, weight_name) = type_of(keys), os.path.split(os.path.abspath(path))
    # A low-noise expert's LoRA has `transformer.` keys (diffusers' convention) and goes into transformer_2.
    into = {"load_into_transformer_2": True} if expert == "low" else {}
    transformer = pipe.transformer_2 if expert == "low" else pipe.transformer
    if kind in ("lora", "dora"):
        pipe.load_lora_weights(location, weight_name=weight_name, adapter_name=ADAPTER, **into)
        # peft scales the adapter's output by lora_scale * alpha / r at every call; works for every family's
        # transformer (FLUX/SD3's joint_attention_kwargs and Wan/Qwen's attention_kwargs differ by name).
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    elif kind == "lokr" and detect_format(keys) == "diffusers":
        transformer.load_lora_adapter(location, weight_name=weight_name, prefix=PREFIX, adapter_name=ADAPTER)
        transformer.set_adapters([ADAPTER], weights=[scale])
    else:
        attach_adapter(transformer, path, family=family, adapter_name=ADAPTER, scale=scale)


def load_full_weights(pipe, path: str) -> None:
    """Load a full fine-tuning checkpoint's `{component}.{param}` weights into the pipeline's components."""
    from safetensors.torch import load_file

    weights = load_file(path)
    for name in sorted({k.split(".", 1)[0] for k in weights}):
        component = getattr(pipe, name)
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        component.load_state_dict(own, strict=True)


def checkpoint_model(lora: str | None) -> dict:
    """`model:` of the config.yaml a raydiff checkpoint carries beside its weights ({} without one)."""
    if lora is None:
        return {}
    directory = lora if os.path.isdir(lora) else os.path.dirname(os.path.abspath(lora))
    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("model") or {}


def family_of_directory(model: str | None) -> str | None:
    """The built-in family whose pipeline a diffusers-format directory holds (model_index.json), if any."""
    import json

    from raydiff.registry import family_for_pipeline

    index = os.path.join(model or "", "model_index.json")
    if not model or not os.path.isfile(index):
        return None
    with open(index) as f:
        return family_for_pipeline(json.load(f).get("_class_name", ""))


def cmd_sample(args) -> None:
    from raydiff.config import UserError
    from raydiff.registry import get_pipeline_class

    if args.lora is not None and not os.path.exists(args.lora):
        raise UserError(f"--lora {args.lora}: no checkpoint directory or LoRA file there")
    from raydiff.training.checkpoint import controlnet_of_checkpoint

    if args.lora is not None and controlnet_of_checkpoint(args.lora) is not None:
        raise UserError(f"--lora {args.lora} is a ControlNet run's checkpoint: pass it as --controlnet, with "
                        f"--control-image")
    if bool(args.controlnet) != bool(args.control_image):
        raise UserError("--controlnet and --control-image go together: the ControlNet reads the control image")
    trained = checkpoint_model(args.lora) or checkpoint_model(args.controlnet)
    model = args.model or trained.get("path")
    family = args.family or trained.get("family") or family_of_directory(model)
    if model is None or family is None:
        missing = " and ".join(f for f, v in (("--model", model), ("--family", family)) if v is None)
        raise UserError(f"pass {missing}: {args.lora or 'no --lora'} has no config.yaml to read it from"
                        + (f", and {model} names no pipeline of a known family" if model else ""))
    if not os.path.isdir(model) and model.startswith((".", "/", "~")):
        raise UserError(f"model {model}: no such directory")
    images = args.image[0] if len(args.image) == 1 else args.image  # one path, or an edit family's list
    conditions = {key: value for key, value in ((image_key(family, args.image), images),
                                                ("control_video", args.control_video),
                                                ("mask_video", args.mask_video),
                                                ("reference_images", args.reference_image),
                                                ("control_image", args.control_image)) if value}
    for path in [p for v in conditions.values() for p in ([v] if isinstance(v, str) else v)]:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file")
    try:
        cls = get_pipeline_class(family)
        if args.controlnet and cls.controlnet_class is None:
            raise ValueError(f"--controlnet: the {family} family has no ControlNet")
        cls.sampling_conditions({k: None for k in conditions if k != "control_image"})  # names only, before loading
    except ValueError as err:
        raise UserError(str(err)) from None
    path = sample(model, args.lora, args.prompt, args.out, family=family, lora_scale=args.lora_scale,
                  steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, seed=args.seed,
                  num_frames=args.num_frames, dtype=args.dtype, device=args.device,
                  expert=args.expert or trained.get("expert"), conditions=conditions, controlnet=args.controlnet)
    say(f"[raydiff] wrote {os.path.abspath(path)}")


def image_key(family: str, images: list[str]) -> str:
    """The data key `--image` fills for `family`: its edit source (`edit_image`, repeatable up to the family's
    limit) or the image an image-to-video family animates (`image`, once)."""
    from raydiff.config import UserError
    from raydiff.registry import EDIT_IMAGE, data_keys

    spec = data_keys(family)
    key = EDIT_IMAGE if EDIT_IMAGE in spec.sampling else "image"
    most = dict(spec.max_paths).get(key, 1)
    if len(images) > most:
        raise UserError(f"--image: {family} takes at most {most} image(s); got {len(images)}")
    return key


def add_sample_parser(subparsers) -> None:
    """Register `raydiff sample` on an argparse subparsers object (`func=cmd_sample`)."""
    from raydiff.config import DTYPE_NAMES
    from raydiff.registry import family_names

    p = subparsers.add_parser("sample", help="render one image from a model and a trained LoRA (diffusers)")
    p.add_argument("--model", default=None, help="diffusers-format model directory or hub id (default: the "
                                                 "checkpoint's config.yaml)")
    p.add_argument("--lora", default=None, help="checkpoint directory (LoRA or full fine-tuning) or LoRA "
                                                ".safetensors file (omit: base model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--family", default=None, choices=family_names(),
                   help="model family (default: the checkpoint's config.yaml, else the model's pipeline class)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the LoRA's effect (0 = base model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.5, help="the pipeline's guidance_scale")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=1, help="video families (4k + 1); the first frame is saved")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--expert", choices=("high", "low"), default=None,
                   help="the Wan 2.2 expert a LoRA file was trained on (default: the checkpoint's model.expert)")
    p.add_argument("--image", action="append", default=[], help="image-to-video families (wan_i2v): the first "
                   "frame; edit families: the source image, repeatable for qwen_image_edit_plus (1-3)")
    p.add_argument("--control-video", default=None, help="wan_vace: the control video (sets the frame count)")
    p.add_argument("--mask-video", default=None, help="wan_vace: white where the control video is regenerated")
    p.add_argument("--reference-image", action="append", default=[], help="wan_vace: a reference image; repeatable")
    p.add_argument("--controlnet", default=None, help="a ControlNet run's checkpoint, or a diffusers ControlNet "
                                                      "(folder or hub id): sample with the family's ControlNet "
                                                      "pipeline (flux, qwen_image, sd3)")
    p.add_argument("--control-image", default=None, help="with --controlnet: the control image (pose, depth, edges)")
    p.set_defaults(func=cmd_sample)
