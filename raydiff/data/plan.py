"""Per-sample decisions that must agree across inline, stream and cache modes: order, flips,
caption dropout. Each is a pure function of (seed, metadata row, repeat copy[, epoch]), never of
which process or block a sample lands in, so the three modes feed workers the same samples.

A sample is identified by `_row` (its record in the metadata file) and `_rep` (which of the
`data.repeat` copies it is). `_key` orders samples: a seeded 63-bit hash, so sorting by it is a
shuffle that the driver (inline, stream) and a Ray Data sort (cache) reproduce alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


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
