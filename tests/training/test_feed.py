"""The worker's data feed: the first epoch is fetched ahead, in order, and its errors reach the loop."""

import threading

import pytest

from raydiff.training.feed import Prefetched


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
