from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from conftest import wait_until

from pictor.errors import DeadlineExceededError
from pictor.server.batching import Batcher


class Model:
    """A stand-in for the forward pass: each call's items doubled, each pass recorded."""

    def __init__(self) -> None:
        self.passes: list[list[list[int]]] = []
        self.fail_next = False

    def run(self, calls: list[list[int]]) -> list[list[int]]:
        self.passes.append(calls)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        return [[2 * item for item in items] for items in calls]


def queued(batcher: Batcher[int, list[int]], pool: ThreadPoolExecutor, calls: list[list[int]],
           still_wanted: list[Any] | None = None) -> list[Future[list[int]]]:
    """``calls`` submitted one after another while ``batcher.lock`` is held (a pass is running):
    the first waits to run the next pass, the others wait in order."""
    def call(items: list[int], check: Any) -> list[int]:
        return batcher(items, check).result

    futures = []
    for i, items in enumerate(calls):
        futures.append(pool.submit(call, items, still_wanted[i] if still_wanted else None))
        wait_until(lambda n=i + 1: len(batcher._waiting) == n, timeout=10, poll=0.001)  # type: ignore[misc]
    return futures


def test_a_lone_call_runs_at_once_in_a_pass_of_its_own() -> None:
    model = Model()
    batcher = Batcher(model.run, max_items=4)
    turn = batcher([1, 2])
    assert turn.result == [2, 4] and model.passes == [[[1, 2]]] and turn.seconds >= 0


def test_calls_that_come_during_a_pass_share_the_next_in_order_up_to_the_limit() -> None:
    model = Model()
    passes: list[int] = []
    batcher = Batcher(model.run, max_items=4, on_pass=passes.append)
    with ThreadPoolExecutor(8) as pool:
        with batcher.lock:
            futures = queued(batcher, pool, [[1], [2, 3], [4], [5], [6, 7, 8, 9, 10], [11]])
        assert [f.result(timeout=10) for f in futures] == [[2], [4, 6], [8], [10], [12, 14, 16, 18, 20], [22]]
    # Oldest first, 4 items at most but one call at least, however many it has.
    assert model.passes == [[[1], [2, 3], [4]], [[5]], [[6, 7, 8, 9, 10]], [[11]]]
    assert passes == [4, 1, 5, 1]


def test_a_call_whose_caller_has_gone_is_left_out_of_its_pass() -> None:
    model = Model()
    batcher = Batcher(model.run, max_items=8)

    def gone() -> None:
        raise DeadlineExceededError("the call ended before classifying")

    with ThreadPoolExecutor(4) as pool:
        with batcher.lock:
            futures = queued(batcher, pool, [[1], [2], [3]], still_wanted=[None, gone, None])
        assert futures[0].result(timeout=10) == [2] and futures[2].result(timeout=10) == [6]
        with pytest.raises(DeadlineExceededError, match="before classifying"):
            futures[1].result(timeout=10)
    assert model.passes == [[[1], [3]]]
    with pytest.raises(DeadlineExceededError):  # alone and gone: no pass at all
        batcher([4], gone)
    assert len(model.passes) == 1

    def exits() -> None:
        raise SystemExit(3)

    # Anything its check raises is that call's, raised in its own thread (it failed them all).
    with ThreadPoolExecutor(4) as pool:
        with batcher.lock:
            futures = queued(batcher, pool, [[5], [6], [7]], still_wanted=[None, exits, None])
        assert futures[0].result(timeout=10) == [10] and futures[2].result(timeout=10) == [14]
        with pytest.raises(SystemExit):
            futures[1].result(timeout=10)


def test_a_caller_gone_while_its_call_waits_leaves_the_queue_before_the_pass() -> None:
    """Its thread is freed while the pass before runs, not held until its own pass."""
    model = Model()
    batcher = Batcher(model.run, max_items=8)
    batcher.GONE_POLL_S = 0.01
    gone = threading.Event()

    def check() -> None:
        if gone.is_set():
            raise DeadlineExceededError("the call ended before classifying")

    with ThreadPoolExecutor(4) as pool:
        with batcher.lock:  # a pass runs
            futures = queued(batcher, pool, [[1], [2], [3]], still_wanted=[None, check, None])
            gone.set()
            with pytest.raises(DeadlineExceededError, match="before classifying"):
                futures[1].result(timeout=10)
            assert [len(c.items) for c in batcher._waiting] == [1, 1]
        assert futures[0].result(timeout=10) == [2] and futures[2].result(timeout=10) == [6]
    assert model.passes == [[[1], [3]]]


def test_a_pass_waits_up_to_the_max_queue_delay_for_more_calls() -> None:
    model = Model()
    batcher = Batcher(model.run, max_items=2, max_delay_s=30.0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher, [1])
        wait_until(lambda: len(batcher._waiting) == 1, timeout=10, poll=0.001)
        assert not first.done()  # waiting for a second call, and the one that fills the pass runs it at once
        assert pool.submit(batcher, [2]).result(timeout=10).result == [4]
        assert first.result(timeout=10).result == [2]
    assert model.passes == [[[1], [2]]]

    # A lone call waits for the delay, no longer.
    batcher = Batcher(model.run, max_items=8, max_delay_s=0.2)
    began = time.perf_counter()
    assert batcher([3]).result == [6]
    assert 0.2 <= time.perf_counter() - began < 10 and model.passes[-1] == [[3]]


def test_an_error_of_a_pass_fails_its_calls_and_the_next_pass_runs() -> None:
    model = Model()
    batcher = Batcher(model.run, max_items=2)
    with ThreadPoolExecutor(4) as pool:
        with batcher.lock:
            futures = queued(batcher, pool, [[1], [2], [3]])
            model.fail_next = True
        for f in futures[:2]:
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result(timeout=10)
        assert futures[2].result(timeout=10) == [6]
    assert batcher([4]).result == [8]


def test_many_threads_each_get_their_own_answer() -> None:
    """Concurrent calls with no lock held: every call answered with its own items, none twice,
    none lost."""
    model = Model()
    batcher = Batcher(model.run, max_items=16)
    rng = random.Random(0)
    calls = [[rng.randrange(1000) for _ in range(rng.randint(1, 5))] for _ in range(400)]
    start = threading.Barrier(16)

    def call(items: list[int]) -> list[int]:
        return batcher(items).result

    def worker(k: int) -> list[tuple[int, list[int]]]:
        start.wait()
        return [(i, call(calls[i])) for i in range(k, len(calls), 16)]

    with ThreadPoolExecutor(16) as pool:
        answers = dict(pair for f in [pool.submit(worker, k) for k in range(16)] for pair in f.result(timeout=60))
    assert answers == {i: [2 * x for x in items] for i, items in enumerate(calls)}
    assert sum(len(p) for p in model.passes) == len(calls)
    assert all(sum(map(len, p)) <= 16 or len(p) == 1 for p in model.passes)
