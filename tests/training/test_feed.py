"""The worker's data feed: the first epoch is fetched ahead, in order, and its errors reach the loop; the
per-epoch shuffle is a seeded permutation in chunks that keeps every column's type."""

import threading

import numpy as np
import pytest

from raydiff.training.feed import Prefetched, shuffled_batches


def test_prefetched_starts_at_once_and_yields_everything_in_order():
    started = threading.Event()

    def items():
        started.set()
        yield from range(5)

    feed = Prefetched(items(), depth=2)
    assert started.wait(timeout=10)  # fetching began before anyone iterated
    assert list(feed) == [0, 1, 2, 3, 4]


def test_prefetched_raises_the_source_error_in_the_consumer():
    def items():
        yield 1
        raise ValueError("row 8, file 'broken.png': truncated or corrupt image")

    feed = iter(Prefetched(items()))
    assert next(feed) == 1
    with pytest.raises(ValueError, match="broken.png"):
        next(feed)


def blocks(n_blocks: int, rows: int = 2):
    """Blocks as Ray Data's numpy format gives them: a fixed-shape tensor, prompts and ragged arrays."""
    for b in range(n_blocks):
        ids = np.arange(b * rows, (b + 1) * rows)
        ragged = np.empty(rows, dtype=object)  # tensors of different shapes in one block: an object array
        for j, i in enumerate(ids):
            ragged[j] = np.zeros((1 + int(i) % 2, 3))
        if b % 2:  # a block whose rows happen to share a shape: one (n, ...) array
            ragged = np.zeros((rows, 2, 3))
        yield {"_row": ids, "latents": ids[:, None] * np.ones((rows, 4)),
               "prompt": np.array([f"p{i}" for i in ids], dtype=object), "source": ragged}


def test_the_shuffle_permutes_each_chunk_into_whole_batches_and_repeats_with_its_seed():
    batches = list(shuffled_batches(blocks(5), batch_size=3, chunk=4, rng=np.random.default_rng(7)))
    order = [int(r) for b in batches for r in b["_row"]]
    assert [len(b["_row"]) for b in batches] == [3, 3, 3]  # 10 rows: 3 whole batches, the last row dropped
    assert len(set(order)) == 9 and set(order[:3]) <= {0, 1, 2, 3}  # the first batch comes from the first chunk
    assert order[:4] != sorted(order[:4])  # permuted
    for b in batches:  # each row's columns travel together and keep their types
        assert b["latents"].shape == (3, 4) and list(b["latents"][:, 0]) == list(b["_row"])
        assert list(b["prompt"]) == [f"p{r}" for r in b["_row"]] and b["prompt"].dtype == object
        assert [s.shape[0] for s in b["source"]] == [2 if (r // 2) % 2 else 1 + r % 2 for r in b["_row"]]
    again = list(shuffled_batches(blocks(5), batch_size=3, chunk=4, rng=np.random.default_rng(7)))
    other = list(shuffled_batches(blocks(5), batch_size=3, chunk=4, rng=np.random.default_rng(8)))
    assert [list(b["_row"]) for b in again] == [list(b["_row"]) for b in batches]
    assert [list(b["_row"]) for b in other] != [list(b["_row"]) for b in batches]
