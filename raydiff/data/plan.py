"""Per-sample decisions that must agree across inline, stream and cache modes: order, flips,
caption dropout. Each is a pure function of (seed, metadata row, repeat copy[, epoch]), never of
which process or block a sample lands in, so the three modes feed workers the same samples.

A sample is identified by `_row` (its record in the metadata file) and `_rep` (which of the
`data.repeat` copies it is). `_key` orders samples: a seeded 63-bit hash, so sorting by it is a
shuffle that the driver (inline, stream) and a Ray Data sort (cache) reproduce alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from raydiff.config import DataConfig
from raydiff.data.decode import VIDEO_KEYS, DecodeSample


def sample_hash(*parts) -> int:
    """A stable 63-bit hash of `parts` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def unit_random(*parts) -> float:
    """A uniform number in [0, 1) fixed by `parts`."""
    return sample_hash(*parts) / 2.0**63


def order_key(seed: int, row: int, rep: int, shuffle: bool = True) -> int:
    """Training order: a seeded hash, or file order copy by copy without shuffling."""
    return sample_hash(seed, "order", int(row), int(rep)) if shuffle else (int(rep) << 40) + int(row)


def flipped(seed: int, row: int) -> bool:
    """One decision per metadata row for the whole run: the flip happens before encoding, so a cache
    holds one version of each sample."""
    return unit_random(seed, "flip", int(row)) < 0.5


def caption_dropped(p: float, seed: int, epoch: int, row: int, rep: int) -> bool:
    return p > 0 and unit_random(seed, "caption", int(epoch), int(row), int(rep)) < p


def order_rows(rows: list[dict], seed: int, shuffle: bool) -> list[dict]:
    """`read_rows` output (the file's rows, `data.repeat` times) -> rows with `_rep` and `_key`,
    sorted by `_key`: shuffled, or file order copy by copy."""
    seen: dict[int, int] = {}
    out = []
    for r in rows:
        rep = seen[r["_row"]] = seen.get(r["_row"], -1) + 1
        out.append({**r, "_rep": rep, "_key": order_key(seed, r["_row"], rep, shuffle)})
    return sorted(out, key=lambda r: r["_key"])


@dataclass
class DecodeRow:
    """Ray Data `flat_map`: the decode stage with buckets and flips.

    A plain row decodes as `DecodeSample` (to its bucket's `_size` when it has one), flipped if
    `data.random_flip` picks it, keeping `_rep` and `_key`. A packed row (`_rows`: a JSON list of
    rows, one bucket batch) becomes one row holding the whole batch: media (B, H, W, 3), prompt,
    `_row`, `_rep` as lists and `_packed` = B.
    """

    cfg: DataConfig
    seed: int = 0
    counter_name: str | None = None

    def __call__(self, row: dict) -> list[dict]:
        if "_rows" not in row:
            return self.decode(row)
        samples = [s for member in json.loads(row["_rows"]) for s in self.decode(member)]
        if not samples:  # dropping the row would leave this worker a batch short of the others
            raise ValueError(f"every sample of bucket batch {row['_batch']} is bad")
        return [pack(samples, self.cfg.data_file_keys, row["_batch"])]

    def decode(self, row: dict) -> list[dict]:
        cfg = self.cfg
        if row.get("_size") is not None:
            h, w = row["_size"]
            cfg = cfg.model_copy(update={"height": int(h), "width": int(w)})
        out = DecodeSample(cfg, self.counter_name)(row)
        for sample in out:
            sample.update({k: row[k] for k in ("_rep", "_key") if k in row})
            if self.cfg.random_flip and flipped(self.seed, row["_row"]):
                for key in self.cfg.data_file_keys:
                    axis = 2 if key in VIDEO_KEYS else 1  # width of (F, H, W, 3) or (H, W, 3)
                    sample[key] = np.ascontiguousarray(np.flip(sample[key], axis=axis))
        return out


def pack(samples: list[dict], media_keys, batch_id: int) -> dict:
    """Per-sample rows of one bucket -> one row holding the batch (`collate` unpacks it)."""
    out = {"_packed": len(samples), "_batch": batch_id}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = np.stack(values) if isinstance(values[0], np.ndarray) else values
    return out


@dataclass
class CaptionDropout:
    """Train a fraction `p` of samples on the empty prompt, decided per (seed, epoch, _row, _rep).

    `empty` holds the empty prompt's encoded columns (stream/cache batches carry embeddings, not
    prompts); without it the prompt string itself becomes "" and the step encodes it.
    """

    p: float
    seed: int
    empty: dict[str, np.ndarray] | None = None

    def __call__(self, batch: dict, epoch: int) -> dict:
        drop = [caption_dropped(self.p, self.seed, epoch, r, k) for r, k in zip(batch["_row"], batch["_rep"])]
        if not any(drop):
            return batch
        batch = dict(batch)
        batch["prompt"] = ["" if d else p for d, p in zip(drop, batch["prompt"])]
        for col, value in (self.empty or {}).items():
            if ":shared" in col:  # the same for every prompt (FLUX's text ids)
                continue
            if col not in batch:
                raise KeyError(f"caption dropout: the batch has no column {col!r}; columns: {sorted(batch)}")
            values = list(batch[col])
            for i, d in enumerate(drop):
                if d:
                    values[i] = value[0]
            batch[col] = values
        return batch
