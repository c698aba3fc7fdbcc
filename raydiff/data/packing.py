"""The packed batch: one Ray Data row that holds a whole bucket batch.

With `data.buckets`, batches are planned in the driver (raydiff.data.buckets) and travel as single
rows, so Ray's equal split hands every worker whole batches, the same number of them. A packed row
has `_packed` = B, `_batch` = its index in the plan, and per column either a (B, ...) array or a list
of B values (prompts, per-sample encodings of different lengths). Workers read packed datasets with
batch size 1 and `unpack` the single row.

    decode stage   pack_samples(decoded samples, batch id)
    encode stage   map_packed(encode, batch of packed rows)      (stream mode)
    cache reading  pack_group(cached rows of one batch)
    collate        unpack(batch of one packed row)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PACKED = "_packed"


def is_packed(batch: dict) -> bool:
    return PACKED in batch


def pack_samples(samples: list[dict], batch_id: int) -> dict:
    """Per-sample rows of one bucket -> one row holding the batch."""
    out = {PACKED: len(samples), "_batch": batch_id}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = stack_arrays(values) if isinstance(values[0], np.ndarray) else values
    return out


def stack_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    """(B, ...) when the arrays share a shape, else an object array of them (edit sources keep their sizes)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def unpack(batch: dict) -> dict:
    """A numpy batch of exactly one packed row -> that row's columns (the whole bucket batch)."""
    assert len(batch[PACKED]) == 1, "iterate packed (bucket) datasets with batch_size=1"
    return {k: v[0] for k, v in batch.items()}


def pack_group(group: dict) -> dict:
    """One bucket batch's rows, in any order, with `_batch` and `_slot` (their planned place) -> one
    packed row, members in planned order."""
    order = np.argsort(group["_slot"])
    row = {PACKED: np.array([len(order)]), "_batch": group["_batch"][:1]}
    for k, v in group.items():
        if k in ("_batch", "_slot"):
            continue
        members = [v[i] for i in order]
        packed = np.empty(1, dtype=object)
        packed[0] = members if v.dtype == object and k == "prompt" else stack_arrays([np.asarray(m) for m in members])
        row[k] = packed
    return row


def map_packed(fn: Callable[[dict], dict], batch: dict) -> dict:
    """Apply `fn` (a batch of samples -> columns of the same samples) to each packed row of a numpy batch;
    the rows stay packed."""
    rows = []
    for i in range(len(batch[PACKED])):
        row = fn({k: v[i] for k, v in batch.items()})
        rows.append({**row, PACKED: batch[PACKED][i], "_batch": batch["_batch"][i]})
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
