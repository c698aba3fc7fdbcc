"""Model cards: the README.md of every final checkpoint and beside every export, so a LoRA says what it is,
what it was trained on and how to load it. Its YAML front matter is what Hugging Face and Civitai read:
`base_model` (a hub id; a local path is not one), `license` (from the base model's own card when it can be
read without the network), `tags`, `instance_prompt` and a `widget` of the validation samples.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import yaml

CARD = "README.md"
MARKER = "<!-- model card written by raydiff for {} -->"  # only a README.md with it, for that file, is overwritten
_STOP_WORDS = frozenset("a an and are as at by for from in into is it its of on or the this to with".split())
_TASKS = {"wan": "text-to-video"}  # the rest generate images
_DIFFUSERS_CLASSES = {"flux": "FluxPipeline", "qwen_image": "QwenImagePipeline", "sd3": "StableDiffusion3Pipeline",
                      "wan": "WanPipeline"}


def trigger_words(prompts: list[str], limit: int = 5) -> list[str]:
    """Words in most prompts (more than half, and at least two; case-folded, common English words left out), most
    frequent first: the tokens a LoRA's captions share, such as an instance token."""
    counts = Counter(w for p in prompts for w in set(re.findall(r"[\w-]+", p.lower())) if w not in _STOP_WORDS)
    common = sorted((w for w, n in counts.items() if n * 2 > len(prompts) and n > 1), key=lambda w: (-counts[w], w))
    return common[:limit]


def dataset_summary(rows: list[dict] | None, repeat: int, num_samples: int) -> dict:
    """What the card says about the training data: its size (before `data.repeat`) and its trigger words.
    Sharded data (`rows` None: the driver holds shard names, never rows) gives its size only."""
    if rows is None:
        return {"size": num_samples // max(repeat, 1), "trigger_words": []}
    prompts = [str(r.get("prompt") or "") for r in rows[:len(rows) // max(repeat, 1)]]
    return {"size": len(prompts), "trigger_words": trigger_words(prompts)}


def _is_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not os.path.exists(path)


def base_license(model_path: str, revision: str | None = None) -> str | None:
    """`license` from the front matter of the base model's README.md: the local directory's, or for a hub id the
    copy in the Hugging Face cache (never the network). None when unknown."""
    readme = os.path.join(model_path, CARD)
    if not os.path.isfile(readme) and _is_hub_id(model_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, CARD, revision=revision)
        readme = cached if isinstance(cached, str) else ""
    if not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8", errors="replace") as f:
        text = f.read()
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    try:
        front = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    return front.get("license") if isinstance(front, dict) else None


def facts_from_config(config: dict, *, steps: int | None, dataset: dict | None, directory: str) -> dict:
    """A card's facts from a run's config (as in its config.yaml), its step count and `dataset_summary`."""
    model, lora, train = config.get("model") or {}, config.get("lora"), config.get("train") or {}
    samples = os.path.join(directory, "samples")
    shown = sorted(f for f in os.listdir(samples) if f[:-4].isdigit()) if os.path.isdir(samples) else []
    prompts = (config.get("validation") or {}).get("prompts") or []
    return {"name": (config.get("ray") or {}).get("name"), "family": model.get("family", "flux"),
            "base_model": model.get("path"), "revision": model.get("revision"),
            "adapter": None if lora is None else {"type": lora.get("type", "lora"), "r": lora.get("rank"),
                                                  "lora_alpha": lora.get("alpha") or lora.get("rank"),
                                                  "target_modules": lora.get("target_modules")},
            "steps": steps, "learning_rate": train.get("learning_rate"), "dataset": dataset or {},
            "validation_prompts": prompts, "samples": [f"samples/{f}" for f in shown][:len(prompts)],
            "grid": "samples/grid.png" if os.path.isfile(os.path.join(samples, "grid.png")) else None}


def _front_matter(facts: dict) -> str:
    kind = (facts["adapter"] or {}).get("type", "full fine-tuning")
    front = {}
    if facts["base_model"] and _is_hub_id(facts["base_model"]):
        front["base_model"] = facts["base_model"]
        front["base_model_relation"] = "adapter" if facts["adapter"] else "finetune"
    if license_ := base_license(facts["base_model"] or "", facts.get("revision")):
        front["license"] = license_
    if kind != "loha":  # diffusers loads the others
        front["library_name"] = "diffusers"
    front["tags"] = ["raydiff", _TASKS.get(facts["family"], "text-to-image"), facts["family"],
                     "lora" if kind == "lora" else kind.replace(" ", "-"), *(["diffusers"] if kind != "loha" else [])]
    if words := facts["dataset"].get("trigger_words"):
        front["instance_prompt"] = " ".join(words)
    if facts["samples"]:
        front["widget"] = [{"text": p, "output": {"url": s}} for p, s in zip(facts["validation_prompts"],
                                                                              facts["samples"])]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def _summary(facts: dict) -> list[str]:
    a, data = facts["adapter"], facts["dataset"]
    rows = [("base model", f"`{facts['base_model']}`"), ("family", f"`{facts['family']}`")]
    if a:
        scale = (a["lora_alpha"] or a["r"]) / a["r"] if a.get("r") else 1
        targets = ", ".join(f"`{t}`" for t in a["target_modules"]) if a.get("target_modules") else "family default"
        rows += [("adapter", f"{a['type']}, rank {a['r']}, alpha {a['lora_alpha']:g} (scale {scale:g}) on {targets}")]
    else:
        rows += [("adapter", "none: full fine-tuning of the trainable models")]
    rows += [("steps", facts["steps"]), ("learning rate", facts["learning_rate"]),
             ("dataset", f"{data['size']} samples" if data.get("size") is not None else None),
             ("trigger words", " ".join(f"`{w}`" for w in data.get("trigger_words") or []) or None),
             ("validation prompts", "; ".join(f"`{p}`" for p in facts["validation_prompts"]) or None)]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    if facts["grid"]:
        lines += ["", f"![validation grid: base model on top, with the adapter below]({facts['grid']})"]
    return lines


def _how_to_load(facts: dict, weights: str, fmt: str) -> list[str]:
    kind, family = (facts["adapter"] or {}).get("type"), facts["family"]
    if kind is None:
        return ["## How to load", "", "`raydiff sample --lora . --prompt \"...\" --out sample.png` loads "
                "`trainable_weights.safetensors` into the base model's pipeline.", ""]
    lines = ["## How to load", ""]
    if (fmt == "diffusers" and kind != "loha") or kind == "lora":  # diffusers converts the other LoRA layouts
        pipeline = _DIFFUSERS_CLASSES.get(family, "DiffusionPipeline")
        call = "pipe.transformer.load_lora_adapter" if kind == "lokr" else "pipe.load_lora_weights"
        prefix = ', prefix="transformer"' if kind == "lokr" else ""
        lines += ["diffusers:", "", "```python", "import torch", f"from diffusers import {pipeline}", "",
                  f'pipe = {pipeline}.from_pretrained("{facts["base_model"]}", torch_dtype=torch.bfloat16)',
                  f'{call}(".", weight_name="{weights}"{prefix})', "```", ""]
    lines += [f'raydiff: `raydiff sample --lora {weights} --prompt "..." --out sample.png`', ""]
    if fmt == "diffsynth":
        lines += [f'DiffSynth-Studio: `pipe.load_lora(pipe.dit, "{weights}")`.', ""]
    if fmt in ("comfyui", "kohya") or (fmt == "diffsynth" and family == "flux"):
        lines += [f"ComfyUI: copy `{weights}` to `ComfyUI/models/loras/` and apply it with a LoraLoaderModelOnly "
                  "node at strength 1 (the trained strength: the scale is folded into the weights).", ""]
    elif kind == "dora":
        lines += ["ComfyUI, kohya and DiffSynth-Studio have no loader that reads DoRA as trained; use diffusers.", ""]
    else:
        lines += ["ComfyUI: `raydiff export . --format comfyui --out lora_comfyui.safetensors` (FLUX and "
                  "Qwen-Image), then copy the file to `ComfyUI/models/loras/`.", ""]
    return lines


def render(facts: dict, *, weights: str, fmt: str = "diffusers") -> str:
    """The card's text: front matter, a summary table, the validation grid and how to load `weights`."""
    kind = (facts["adapter"] or {}).get("type", "full fine-tuning")
    title = f"# {facts['name'] or 'raydiff run'}: {kind} for {facts['family']}"
    note = f"`{weights}` is in {fmt} format, its scale folded into the weights (alpha = rank)."
    body = [title, "", MARKER.format(weights), "", *_summary(facts), "", *([note, ""] if fmt != "diffusers" else []),
            *_how_to_load(facts, weights, fmt), "Trained with raydiff on Ray."]
    return _front_matter(facts) + "\n" + "\n".join(body) + "\n"


def write_card(directory: str, facts: dict, *, weights: str, fmt: str = "diffusers") -> str:
    """Write `directory/README.md`, or `<weights stem>.README.md` when a README.md is there that raydiff did not
    write for `weights` (a checkpoint's own card stays when an export lands beside it). Returns the path."""
    path = os.path.join(directory, CARD)
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if MARKER.format(weights) not in f.read():
                path = os.path.join(directory, os.path.splitext(weights)[0] + ".README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(facts, weights=weights, fmt=fmt))
    return path


def export_facts(checkpoint: str, info: dict, family: str | None) -> dict:
    """Facts for an exported file: from the checkpoint's config.yaml and trainer_state.json when it has them."""
    directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    config, steps = {}, None
    if os.path.isfile(os.path.join(directory, "config.yaml")):
        with open(os.path.join(directory, "config.yaml")) as f:
            config = yaml.safe_load(f) or {}
    if os.path.isfile(os.path.join(directory, "trainer_state.json")):
        with open(os.path.join(directory, "trainer_state.json")) as f:
            steps = json.load(f).get("global_step")
    facts = facts_from_config(config, steps=steps, dataset=None, directory=directory)
    facts["family"] = family or facts["family"]
    facts["adapter"] = {**(facts["adapter"] or {}), "type": info["type"], "r": info["r"],
                        "lora_alpha": info["lora_alpha"]}
    facts["samples"], facts["grid"] = [], None  # they stay with the checkpoint
    return facts
