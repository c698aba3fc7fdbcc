"""The encoder: a pipeline loaded without its trainable models (raydiff.data.components), running the units
that touch none of them (VAE, text encoders) on decoded batches. The Ray Data stage that runs it is
raydiff.data.encode."""

from __future__ import annotations

import numpy as np
import torch

from raydiff.config import RaydiffConfig
from raydiff.data.collate import collate
from raydiff.data.columns import to_columns
from raydiff.data.components import encoder_components, worker_models
from raydiff.data.packing import stack_arrays
from raydiff.pipelines.base import run_units, split_units
from raydiff.registry import get_pipeline_class

_PASS_THROUGH = ("prompt", "_row", "_rep", "_key", "_size")


def encoder_device(cfg: RaydiffConfig) -> torch.device:
    return torch.device("cuda" if cfg.data.encoder_num_gpus > 0 and torch.cuda.is_available() else "cpu")


class Encoder:
    """The pipeline without its trainable models, and the units it can run ahead of training."""

    def __init__(self, cfg: RaydiffConfig, device=None):
        self.cfg, self.device = cfg, torch.device(device or encoder_device(cfg))
        self.pipe = get_pipeline_class(cfg.model.family).from_config(cfg, self.device, encoder_components(cfg))
        self.units, _ = split_units(self.pipe, worker_models(cfg))
        self.media_keys = tuple(cfg.data.data_file_keys)

    @torch.no_grad()
    def run(self, inputs: dict, units=None) -> dict:
        """Run encode units on model inputs; returns only what the units produced."""
        units = self.units if units is None else units
        out = run_units(self.pipe, inputs, units)
        return {k: out[k] for u in units for k in u.output_params}

    def encode(self, batch: dict) -> dict[str, np.ndarray]:
        """A decoded numpy batch (media uint8, prompt, _row, ...) -> encoded columns plus the
        pass-through ones. Samples of different sizes are encoded in groups of one size."""
        n = len(batch["prompt"])
        media = self.media_keys[0]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(np.shape(batch[media][i]), []).append(i)
        parts = []
        for index in groups.values():
            sub = {k: [batch[k][i] for i in index] for k in ("prompt", *self.media_keys)}
            sub.update({k: stack_arrays(sub[k]) for k in self.media_keys})  # edit sources may vary in size
            outputs = self.run(collate(sub, self.device, self.media_keys))
            parts.append((index, to_columns(outputs, len(index), self.pipe.shared_outputs)))
        cols = {}
        for name in parts[0][1]:
            if len(parts) == 1:
                cols[name] = parts[0][1][name]
                continue
            merged = np.empty(n, dtype=object)
            for index, part in parts:
                for j, i in enumerate(index):
                    merged[i] = part[name][j]
            cols[name] = merged
        cols.update({k: np.asarray(batch[k]) for k in _PASS_THROUGH if k in batch})
        return cols

    def prompt_units(self):
        return [u for u in self.units if set(u.input_params) <= {"prompt"}]

    def empty_prompt(self) -> dict[str, np.ndarray]:
        """The empty prompt's encoded columns (batch of one), for caption dropout."""
        return to_columns(self.run({"prompt": [""]}, self.prompt_units()), 1, self.pipe.shared_outputs)
