"""Turn a numpy batch from Ray Data into model inputs on the worker's device."""

from __future__ import annotations

import numpy as np
import torch

from raydiff.data.columns import columns_to_inputs
from raydiff.data.decode import NATIVE_KEYS
from raydiff.data.metadata import is_regularization
from raydiff.data.packing import is_packed, unpack


def collate(batch: dict, device: torch.device, data_file_keys=("image",), *, caption_dropout=None,
            epoch: int = 0) -> dict:
    """A numpy batch from Ray Data -> model inputs: media as float (B, 3, H, W) or (B, 3, F, H, W)
    in [-1, 1], prompts as a list of str; edit sources (NATIVE_KEYS) (B, 3, N, H, W), or of mixed sizes a
    list of B (3, N, H, W).

    A bucket batch arrives as one packed row (raydiff.data.packing) and is unpacked first. Stream/cache
    batches carry encoded columns instead of media (raydiff.data.columns); they come back as the tensors
    their units produced, so the training step skips those units. `caption_dropout`
    (`raydiff.data.plan.CaptionDropout`) swaps in the empty prompt for the samples it picks in `epoch`.
    """
    if is_packed(batch):
        batch = unpack(batch)
    if caption_dropout is not None:
        batch = caption_dropout(batch, epoch)
    out = {"prompt": [str(p) for p in batch["prompt"]]}
    for key in data_file_keys:
        if key not in batch:  # stream/cache batches carry latents instead
            continue
        arr = batch[key]
        if arr.dtype == object:  # ragged: a batch mixing sizes (needs buckets; see data.height/width)
            shapes = {a.shape for a in arr}
            if len(shapes) > 1 and key in NATIVE_KEYS:  # edit sources: their family resizes them one by one
                out[key] = [_unit_range(a[None], device)[0] for a in arr]
                continue
            if len(shapes) > 1:
                raise ValueError(f"a batch mixes {key} sizes {sorted(shapes)}; set data.buckets: true, or a fixed "
                                 f"data.height and data.width, or train.batch_size 1")
            arr = np.stack(list(arr))
        out[key] = _unit_range(arr, device)
    out.update(columns_to_inputs(batch, device, skip=data_file_keys))
    if "_row" in batch and (reg := is_regularization(batch["_row"])).any():
        out["_regularization"] = torch.from_numpy(reg)  # which samples `data.regularization` weights
    return out


def _unit_range(arr: np.ndarray, device) -> torch.Tensor:
    """uint8 (B, ..., 3) -> float (B, 3, ...) in [-1, 1] on `device`."""
    x = torch.from_numpy(np.array(arr)).to(device, non_blocking=True)  # copy: Arrow buffers are read-only
    return x.movedim(-1, 1).float().div_(127.5).sub_(1.0)
