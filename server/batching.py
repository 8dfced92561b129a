"""Dynamic batching: the images of concurrent calls through the model in one forward pass.

Pure logic over a ``run`` function, free of torch and gRPC (``Engine`` gives it the model).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")  # a preprocessed image, to the engine
Result = TypeVar("Result")  # what one call gets back


@dataclass
class Turn(Generic[Result]):
    """A call's part of a forward pass, and when that pass ran (``time.perf_counter``)."""

    result: Result
    began: float
    seconds: float


@dataclass
class _Call(Generic[Item, Result]):
    items: list[Item]
    still_wanted: Callable[[], None] | None
    came: float = field(default_factory=time.perf_counter)
    taken: bool = False  # into a pass: no longer in the queue
    turn: Turn[Result] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.turn is not None or self.error is not None


class Batcher(Generic[Item, Result]):
    """Runs the calls waiting for the model together. Whoever finds the model free takes the
    oldest waiting calls, ``max_items`` items in all (one call at least, however many it has),
    runs them in one pass and hands each call its part; calls that come meanwhile wait and form
    the next pass. By default no call waits for a pass to fill (Triton's max queue delay 0): a
    pass is as large as the calls that came during the one before, so a lone call runs at once.
    With ``max_delay_s``, a pass that is not full waits for more calls until its oldest has
    waited that long (a GPU, whose larger passes cost little more than small ones, gains).

    ``run`` takes each call's items and returns each call's result, in order. ``still_wanted``
    runs when its call's pass begins and may raise to leave the call out (its caller has gone);
    while the call waits its turn it runs every ``GONE_POLL_S`` too (under the queue's lock: it
    must be quick), and what it raises takes the call out of the queue at once, freeing its
    thread. An error from ``run`` fails every call of that pass. ``lock`` is held through each
    pass (whoever holds it holds the model: tests stand for a long pass with it).
    """

    GONE_POLL_S = 0.1

    def __init__(self, run: Callable[[list[list[Item]]], list[Result]], max_items: int, *,
                 max_delay_s: float = 0.0, on_pass: Callable[[int], None] | None = None) -> None:
        self.run, self.max_items, self.max_delay_s, self.on_pass = run, max_items, max_delay_s, on_pass
        self.lock = threading.Lock()
        queue_lock = threading.Lock()
        self._changed = threading.Condition(queue_lock)  # a pass ended
        self._came = threading.Condition(queue_lock)  # a call came (what a pass waiting to fill waits for)
        self._waiting: deque[_Call[Item, Result]] = deque()
        self._running = False

    def __call__(self, items: list[Item], still_wanted: Callable[[], None] | None = None) -> Turn[Result]:
        call = _Call[Item, Result](items, still_wanted)
        with self._changed:
            self._waiting.append(call)
            self._came.notify()
        while True:
            with self._changed:
                while self._running and not call.done:
                    self._changed.wait(None if still_wanted is None else self.GONE_POLL_S)
                    if still_wanted is not None and not call.done and not call.taken:
                        self._leave_if_gone(call, still_wanted)
                if call.done:
                    break
                self._running = True  # this thread runs the next pass; it may not hold its own call
            try:
                with self.lock:
                    with self._changed:
                        self._wait_to_fill()
                        taken = self._take()
                    self._run_pass(taken)
            finally:
                with self._changed:
                    self._running = False
                    self._changed.notify_all()
        if call.error is not None:
            raise call.error
        assert call.turn is not None
        return call.turn

    def _leave_if_gone(self, call: _Call[Item, Result], still_wanted: Callable[[], None]) -> None:
        """Out of the queue, raising what ``still_wanted`` raises (queue lock held)."""
        try:
            still_wanted()
        except BaseException:
            self._waiting.remove(call)
            raise

    def _wait_to_fill(self) -> None:
        """Until the waiting calls fill a pass or the oldest has waited ``max_delay_s`` (queue
        lock held; the oldest may leave meanwhile, so its time is read again on each wake)."""
        while sum(len(c.items) for c in self._waiting) < self.max_items:
            left = self._waiting[0].came + self.max_delay_s - time.perf_counter()
            if left <= 0:
                return
            self._came.wait(left)

    def _take(self) -> list[_Call[Item, Result]]:
        taken = [self._waiting.popleft()]
        items = len(taken[0].items)
        while self._waiting and items + len(self._waiting[0].items) <= self.max_items:
            items += len(self._waiting[0].items)
            taken.append(self._waiting.popleft())
        for call in taken:
            call.taken = True
        return taken

    def _run_pass(self, calls: list[_Call[Item, Result]]) -> None:
        try:
            wanted = [call for call in calls if self._still_wanted(call)]
            if not wanted:
                return
            began = time.perf_counter()
            results = self.run([call.items for call in wanted])
            seconds = time.perf_counter() - began
            for call, result in zip(wanted, results, strict=True):
                call.turn = Turn(result, began, seconds)
            if self.on_pass is not None:
                self.on_pass(sum(len(call.items) for call in wanted))
        except BaseException as e:  # every call of the pass fails with it, none is left waiting
            for call in calls:
                if not call.done:
                    call.error = e
            if not isinstance(e, Exception):
                raise

    @staticmethod
    def _still_wanted(call: _Call[Item, Result]) -> bool:
        try:
            if call.still_wanted is not None:
                call.still_wanted()
            return True
        except BaseException as e:  # that call's own: raised in its thread, the others' pass runs
            call.error = e
            return False
