"""`prefetch`: order kept, producer errors raised at the consumer, bounded, stops early."""

from __future__ import annotations

import threading
import time

import pytest

from app.pipeline import prefetch


def test_items_arrive_in_order() -> None:
    assert list(prefetch(range(50), depth=3)) == list(range(50))


def test_a_producer_error_is_raised_in_the_consumer_after_the_good_items() -> None:
    def produce():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(produce()):
            seen.append(item)
    assert seen == [1, 2]


def test_the_producer_stays_at_most_depth_items_ahead_and_stops_when_closed() -> None:
    produced = []

    def produce():
        for i in range(1000):
            produced.append(i)
            yield i

    items = prefetch(produce(), depth=2)
    assert next(items) == 0
    time.sleep(0.3)
    assert len(produced) <= 4  # one consumed, two queued, one waiting to be queued
    items.close()  # joins the producer
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        next(prefetch([1], depth=0))
