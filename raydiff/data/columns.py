"""Unit outputs <-> numpy columns: how encoded samples travel through Ray Data and the cache.

An encoder's unit outputs for a batch become per-sample numpy columns (`to_columns`); a worker turns
a batch of such columns back into the tensors the units produced (`columns_to_inputs`), so its
training module sees those outputs already present and runs only the denoiser.

Column names carry how to rebuild a value: `name[:shared][:bf16][:none]`.
  shared  the output has no batch axis (FLUX's text_ids (L, 3), ints such as height); every sample
          stores a copy and collate keeps one
  bf16    numpy has no bfloat16: the raw bits travel as int16 and are viewed back
  none    the unit returned None
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch


def to_columns(outputs: dict, batch_size: int, shared: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Unit outputs for a batch of `batch_size` -> numpy columns of `batch_size` rows each. `shared`:
    outputs known to have no batch axis although their first dimension may equal the batch size (a
    family's `shared_outputs`)."""
    cols = {}
    for name, value in outputs.items():
        if value is None:
            cols[f"{name}:none"] = np.zeros(batch_size, dtype=np.int8)
            continue
        per_sample = (torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch_size
                      and name not in shared)
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
