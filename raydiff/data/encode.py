"""The encode stage: a pipeline's encode units (VAE, text encoders) run ahead of training.

`split_units(pipe, trainable)` names the units that touch no trainable model; an `Encoder` loads
the pipeline *without* the trainable models and runs them on decoded batches. Their outputs become
per-sample numpy columns (raydiff.data.columns) that Ray Data carries to the workers (stream) or
parquet stores (cache). Which components each side loads is decided here too.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raydiff.config import RaydiffConfig, from_remote, to_remote
from raydiff.config.libraries import hide_unused_libraries
from raydiff.console import quiet_libraries
from raydiff.data.collate import collate
from raydiff.data.columns import to_columns
from raydiff.data.packing import is_packed, map_packed, stack_arrays
from raydiff.pipelines.base import run_units, split_units
from raydiff.registry import get_pipeline_class

_PASS_THROUGH = ("prompt", "_row", "_rep", "_key", "_size")


def trainable_names(cfg: RaydiffConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.train.trainable_models, *([cfg.lora.base_model] if cfg.lora else [])]))


def worker_models(cfg: RaydiffConfig) -> list[str]:
    """The models only training workers hold in stream/cache mode: the trainable ones and, beside a ControlNet,
    the frozen DiT it feeds (its units, FLUX's guidance, then run in the step: an encoder never loads a DiT)."""
    dit = [cfg.model.denoiser or get_pipeline_class(cfg.model.family).dit_name] if cfg.model.controlnet else []
    return list(dict.fromkeys([*trainable_names(cfg), *dit]))


def encoder_components(cfg: RaydiffConfig) -> list[str]:
    """What an encoder actor loads: every component except the workers' (`worker_models`)."""
    trainable = set(worker_models(cfg))
    return [c for c in get_pipeline_class(cfg.model.family).model_names() if c not in trainable]


def training_components(cfg: RaydiffConfig) -> list[str] | None:
    """What a training worker loads: everything inline (None), else the DiT, the trainable models and
    the tokenizers (small; a trainable text encoder's prompt unit runs in the step and needs them)."""
    if cfg.data.preprocess == "inline":
        return None
    cls = get_pipeline_class(cfg.model.family)
    denoiser = cfg.model.denoiser or cls.dit_name
    wanted = [denoiser, *trainable_names(cfg), *(c for c in cls.component_names if c.startswith("tokenizer"))]
    return [c for c in dict.fromkeys(wanted) if c in cls.model_names()]


# --- the encoder ------------------------------------------------------------------------------

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


class EncodeBatch:
    """Ray Data `map_batches` class for stream mode: each actor holds one `Encoder`.
    Packed rows (bucket batches) are encoded batch by batch and stay packed."""

    def __init__(self, config: dict):
        cfg = from_remote(config)
        hide_unused_libraries(cfg)  # an actor serves one run
        quiet_libraries()
        self.encoder = Encoder(cfg)

    def __call__(self, batch: dict) -> dict:
        return map_packed(self.encoder.encode, batch) if is_packed(batch) else self.encoder.encode(batch)


def encode_empty_prompt(config: dict) -> dict[str, np.ndarray]:
    """The empty prompt's encoded columns (batch of one), for caption dropout in stream/cache mode.
    Runs in a Ray task with the encoder's resources; loads the encoders once."""
    quiet_libraries()
    return Encoder(from_remote(config)).empty_prompt()


def start_empty_prompt(cfg: RaydiffConfig) -> ray.ObjectRef:
    """`encode_empty_prompt` started in a Ray task with an encoder actor's resources (the driver loads no model);
    `ray.get` the answer where it is needed, so the encoding overlaps whatever comes first (a run's start)."""
    d = cfg.data
    # DEFAULT: outside the caller's placement group (a Tune trial's holds only its driver), as Ray Data's tasks.
    task = ray.remote(encode_empty_prompt).options(num_cpus=d.encoder_num_cpus, num_gpus=d.encoder_num_gpus,
                                                   scheduling_strategy="DEFAULT")
    return task.remote(to_remote(cfg))
