"""The encode stage: a pipeline's encode units (VAE, text encoders) run ahead of training.

`split_units(pipe, trainable)` names the units that touch no trainable model; an `Encoder` loads
the pipeline *without* the trainable models and runs them on decoded batches. Their outputs become
per-sample numpy columns that Ray Data carries to the workers (stream) or parquet stores (cache);
`columns_to_inputs` turns them back into the tensors the units produced, so the worker's training
module sees the outputs already present and runs only the DiT.

Column names carry how to rebuild a value: `name[:shared][:bf16][:none]`.
  shared  the output has no batch axis (FLUX's text_ids (L, 3), ints such as height); every sample
          stores a copy and collate keeps one
  bf16    numpy has no bfloat16: the raw bits travel as int16 and are viewed back
  none    the unit returned None
"""

from __future__ import annotations

import numpy as np
import torch

from raydiff.config import RaydiffConfig

# Outputs without a batch axis whose first dimension could be mistaken for one.
SHARED_OUTPUTS = frozenset({"text_ids"})
_PASS_THROUGH = ("prompt", "_row", "_rep", "_key", "_size")


def trainable_names(cfg: RaydiffConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.train.trainable_models, *([cfg.lora.base_model] if cfg.lora else [])]))


def encoder_components(cfg: RaydiffConfig) -> list[str]:
    """What an encoder actor loads: every component except the trainable ones."""
    from raydiff.pipelines.base import get_pipeline_class

    trainable = set(trainable_names(cfg))
    return [c for c in get_pipeline_class(cfg.model.family).component_names if c not in trainable]


def training_components(cfg: RaydiffConfig) -> list[str] | None:
    """What a training worker loads: everything inline (None), else the DiT, the trainable models and
    the tokenizers (small; a trainable text encoder's prompt unit runs in the step and needs them)."""
    if cfg.data.preprocess == "inline":
        return None
    from raydiff.pipelines.base import get_pipeline_class

    cls = get_pipeline_class(cfg.model.family)
    wanted = [cls.dit_name, *trainable_names(cfg), *(c for c in cls.component_names if c.startswith("tokenizer"))]
    return [c for c in dict.fromkeys(wanted) if c in cls.component_names]


# --- tensors <-> columns ----------------------------------------------------------------------

def to_columns(outputs: dict, batch_size: int) -> dict[str, np.ndarray]:
    """Unit outputs for a batch of `batch_size` -> numpy columns of `batch_size` rows each."""
    cols = {}
    for name, value in outputs.items():
        if value is None:
            cols[f"{name}:none"] = np.zeros(batch_size, dtype=np.int8)
            continue
        per_sample = (torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch_size
                      and name not in SHARED_OUTPUTS)
        flags = "" if per_sample else ":shared"
        if torch.is_tensor(value):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value, flags = value.view(torch.int16), flags + ":bf16"
            array = value.numpy()
        else:
            array = np.asarray(value)
        cols[name + flags] = array if per_sample else np.repeat(array[None], batch_size, axis=0)
    return cols


def _stack(name: str, values) -> np.ndarray:
    """Per-sample arrays -> one (B, ...) array; arrays that differ only in their first axis (prompt
    embeddings and masks padded to the longest prompt of their encoder batch) are right-padded with 0."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values
    values = [np.asarray(v) for v in values]
    shapes = {v.shape for v in values}
    if len(shapes) == 1:
        return np.stack(values)
    if len({s[1:] for s in shapes}) > 1 or any(len(s) == 0 for s in shapes):
        raise ValueError(f"a batch mixes {name} shapes {sorted(shapes)}; use data.buckets or batch_size 1")
    longest = max(s[0] for s in shapes)
    return np.stack([np.pad(v, [(0, longest - v.shape[0])] + [(0, 0)] * (v.ndim - 1)) for v in values])


def columns_to_inputs(batch: dict, device, skip=()) -> dict:
    """Encoded columns of a numpy batch -> the unit outputs they came from, on `device`.
    Columns starting with `_`, `prompt` and those in `skip` (media) are left out."""
    out = {}
    for col, values in batch.items():
        if col.startswith("_") or col == "prompt" or col in skip:
            continue
        name, *flags = col.split(":")
        if "none" in flags:
            out[name] = None
            continue
        array = np.asarray(values[0]) if "shared" in flags else _stack(name, values)
        tensor = torch.from_numpy(np.array(array))  # a copy: Arrow buffers are read-only
        if "bf16" in flags:
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.item() if "shared" in flags and tensor.ndim == 0 else tensor.to(device, non_blocking=True)
    return out


# --- the encoder ------------------------------------------------------------------------------

def encoder_device(cfg: RaydiffConfig) -> torch.device:
    return torch.device("cuda" if cfg.data.encoder_num_gpus > 0 and torch.cuda.is_available() else "cpu")


class Encoder:
    """The pipeline without its trainable models, and the units it can run ahead of training."""

    def __init__(self, cfg: RaydiffConfig, device=None):
        from raydiff.pipelines.base import DTYPES, get_pipeline_class, split_units

        self.cfg, self.device = cfg, torch.device(device or encoder_device(cfg))
        cls = get_pipeline_class(cfg.model.family)
        self.pipe = cls.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=self.device,
                                        components=encoder_components(cfg), revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code, guidance=cfg.model.guidance,
                                        max_sequence_length=cfg.model.max_sequence_length)
        self.units, _ = split_units(self.pipe, trainable_names(cfg))
        self.media_keys = tuple(cfg.data.data_file_keys)

    @torch.no_grad()
    def run(self, inputs: dict, units=None) -> dict:
        """Run encode units on model inputs; returns only what the units produced."""
        from raydiff.pipelines.base import run_units

        units = self.units if units is None else units
        out = run_units(self.pipe, inputs, units)
        return {k: out[k] for u in units for k in u.output_params}

    def encode(self, batch: dict) -> dict[str, np.ndarray]:
        """A decoded numpy batch (media uint8, prompt, _row, ...) -> encoded columns plus the
        pass-through ones. Samples of different sizes are encoded in groups of one size."""
        from raydiff.data.collate import collate

        n = len(batch["prompt"])
        media = self.media_keys[0]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(np.shape(batch[media][i]), []).append(i)
        parts = []
        for index in groups.values():
            sub = {k: [batch[k][i] for i in index] for k in ("prompt", *self.media_keys)}
            sub.update({k: np.stack(sub[k]) for k in self.media_keys})
            parts.append((index, to_columns(self.run(collate(sub, self.device, self.media_keys)), len(index))))
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


class EncodeBatch:
    """Ray Data `map_batches` class for stream mode: each actor holds one `Encoder`.
    Packed rows (bucket batches) are encoded batch by batch and stay packed."""

    def __init__(self, config: dict):
        from raydiff.config import parse_config
        from raydiff.console import quiet_libraries

        quiet_libraries()
        self.encoder = Encoder(parse_config(config))

    def __call__(self, batch: dict) -> dict:
        if "_packed" not in batch:
            return self.encoder.encode(batch)
        rows = []
        for i in range(len(batch["_packed"])):
            row = self.encoder.encode({k: v[i] for k, v in batch.items()})
            rows.append({**row, "_packed": batch["_packed"][i], "_batch": batch["_batch"][i]})
        out = {}
        for k in rows[0]:
            values = [r[k] for r in rows]
            out[k] = np.asarray(values) if np.ndim(values[0]) == 0 else _object_array(values)
        return out


def _object_array(values: list) -> np.ndarray:
    """One row per entry, each entry a packed batch: an array (any shapes), or a list of str."""
    values = [np.asarray(v) for v in values]
    out = np.empty(len(values), dtype=object)
    if values[0].dtype.kind in "UO":  # prompts: lists of str become Arrow list<string>, not pickles
        for i, v in enumerate(values):
            out[i] = [str(x) for x in v]
        return out
    if len({v.shape for v in values}) == 1:
        return np.stack(values)
    for i, v in enumerate(values):
        out[i] = v
    return out


def encode_empty_prompt(config: dict) -> dict[str, np.ndarray]:
    """The empty prompt's encoded columns (batch of one), for caption dropout in stream/cache mode.
    Runs in a Ray task with the encoder's resources; loads the encoders once."""
    from raydiff.config import parse_config
    from raydiff.console import quiet_libraries

    quiet_libraries()
    encoder = Encoder(parse_config(config))
    units = encoder.prompt_units()
    return to_columns(encoder.run({"prompt": [""]}, units), 1)
