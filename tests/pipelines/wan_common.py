"""Helpers the Wan family tests share: random clips, capturing the diffusers pipeline's transformer calls,
and the encode-ahead path (Encoder -> numpy columns -> collate -> module) next to the inline one."""

from __future__ import annotations

import numpy as np
import torch

from raydiff.config import parse_config
from raydiff.data.collate import collate
from raydiff.data.components import training_components
from raydiff.data.encoder import Encoder
from raydiff.training.module import PipelineTrainingModule

PROMPTS = ["a red fox jumps", "waves at night"]
MAX_LEN = 16


def rand_video(b=2, f=9, size=16, seed=0):
    """(B, 3, F, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, size, size, generator=g) * 2 - 1


def uint8_clips(b=2, f=9, size=16, seed=0) -> np.ndarray:
    """(B, F, H, W, 3) uint8, as the decode stage hands clips on."""
    return np.random.default_rng(seed).integers(0, 256, (b, f, size, size, 3), dtype=np.uint8)


def capture_calls(transformer):
    """Every forward of `transformer`: (kwargs, output) in call order."""
    calls = []
    transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    return calls


def conditions_of(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in {"latents", "video", "image", "prompt", "loss_mask"}}


def wan_config(path: str, family: str = "wan", data_file_keys=("video",), **sections) -> dict:
    raw = {"model": {"family": family, "path": path, "max_sequence_length": MAX_LEN},
           "data": {"metadata_path": "unused.csv", "data_file_keys": list(data_file_keys)},
           "lora": {"rank": 4, "alpha": 8}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def randomize_lora(module, seed=1):
    """Seeded LoRA weights with a non-zero B, so the adapter changes the output and two modules built at
    different RNG states (peft draws A from the global one) hold the same adapter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def inline_and_ahead_losses(raw: dict, batch: dict, seed: int = 0) -> tuple[float, float]:
    """The loss of one decoded numpy `batch` computed inline (the whole pipeline in the module) and ahead
    (an Encoder without the trainable model, its columns collated for a DiT-only module), same LoRA and
    generator."""
    inline_cfg = parse_config({**raw, "data": {**raw["data"], "preprocess": "inline"}})
    ahead_cfg = parse_config({**raw, "data": {**raw["data"], "preprocess": "stream"}})
    keys = inline_cfg.data.data_file_keys
    inline = PipelineTrainingModule(inline_cfg)
    ahead = PipelineTrainingModule(ahead_cfg, components=training_components(ahead_cfg))
    randomize_lora(inline)
    randomize_lora(ahead)
    columns = Encoder(ahead_cfg).encode(batch)
    assert not set(keys) & set(columns), "encoded columns carry no media"
    with torch.no_grad():
        a = inline(collate(batch, "cpu", keys), generator=torch.Generator().manual_seed(seed)).item()
        b = ahead(collate(columns, "cpu", keys), generator=torch.Generator().manual_seed(seed)).item()
    return a, b
