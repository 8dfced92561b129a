"""What may hold the server's handler threads, and for how long: the busy refusals of calls
beyond what the threads allow, client streams that go quiet, and callers that have gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import TypeVar, cast

import grpc

from pictor.errors import DeadlineExceededError, ServerBusyError

log = logging.getLogger(__name__)

REFUSALS_LOG_EVERY_S = 10.0  # a line saying how many calls were refused as busy, at most this often
_STREAM_END = object()  # the client closed its side of the stream
T = TypeVar("T")


def check_active(context: grpc.ServicerContext, before: str) -> None:
    """Skip work for a caller that has gone: its deadline passed (maybe while the call waited
    for a handler thread) or it cancelled. Nothing it would not see is done, nor, for Upsert
    and Delete, written (checked again once the write lock is held: a write may queue there
    behind a rebuild of the index)."""
    if not context.is_active():
        raise DeadlineExceededError(f"the call ended (its deadline passed, its caller cancelled it, or the "
                                    f"server is stopping) before {before}")


class HandlerThreads:
    """What may hold the server's handler threads (its --workers), so that one is always free
    for the calls that answer at once: health Check, Info, Get, List, Search by key or vector.

    A client stream (Upsert, reflection) holds its thread for as long as its client sends: at
    most half of them are streams. A call that runs the model (Classify, Embed, Search by image)
    holds its thread while it waits for the forward pass, which runs one at a time (for all the
    calls waiting, batched): behind 64 clients classifying, health checks waited over a second in
    gRPC's queue (bench/health.py).
    A Delete waits likewise for the store's write lock, which a write holds through a rebuild
    of the index (minutes at a million items). Streams and such waiting calls together leave
    one thread free; one beyond is refused at once (RESOURCE_EXHAUSTED), which frees its
    thread for the next call in the queue.
    """

    def __init__(self, workers: int) -> None:
        self.workers, self.max_streams = workers, workers // 2
        self._lock = threading.Lock()
        self._streams = self._waiting_calls = 0
        self._refused, self._refusals_logged_at = 0, -math.inf
        self._log_timer: threading.Timer | None = None

    @contextlib.contextmanager
    def stream(self, refused: str) -> Iterator[None]:
        """A thread for a client stream for the block; ``ServerBusyError`` (saying ``refused``)
        when none may be taken."""
        with self._lock:
            if self._streams >= self.max_streams:
                n = self.max_streams
                raise self._refusal(
                    f"{n} stream{'s are' if n != 1 else ' is'} open already (Upsert or reflection; this "
                    f"server's limit: half its --workers); {refused}, send again when one has ended")
            self._check_one_left(refused)
            self._streams += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1

    @contextlib.contextmanager
    def waiting_call(self, refused: str) -> Iterator[None]:
        """A thread for a call that may wait its turn (for the model or the write lock), for the
        block; ``ServerBusyError`` (saying ``refused``) when it would take the last free one."""
        with self._lock:
            self._check_one_left(refused)
            self._waiting_calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting_calls -= 1

    def _check_one_left(self, refused: str) -> None:
        if self._streams + self._waiting_calls < self.workers - 1:
            return
        n, m = self._waiting_calls, self._streams
        holders = []
        if n:
            holders.append(f"{n} call{' that waits' if n == 1 else 's that wait'} for the model or a write "
                           "(Classify, Embed, Search by image, Delete)")
        if m:
            holders.append(f"{m} open stream{'s' if m != 1 else ''} (Upsert, reflection)")
        raise self._refusal(
            f"the server is busy: {' and '.join(holders)} hold{'s' if n + m == 1 else ''} all "
            f"but one of its {self.workers} handler threads (--workers), which is kept for health checks "
            f"and lookups; {refused}, send again shortly")

    def _refusal(self, message: str) -> ServerBusyError:
        """The error for a call refused as busy (under the lock), counted in a log line at most
        every REFUSALS_LOG_EVERY_S: at once after a quiet spell, else by a timer at the end of
        the spell, so that no count waits for a refusal that may never come."""
        self._refused += 1
        if self._log_timer is None:
            wait = self._refusals_logged_at + REFUSALS_LOG_EVERY_S - time.monotonic()
            if wait <= 0:
                self._log_refusals()
            else:
                timer = threading.Timer(wait, self.flush_refusals)
                timer.daemon = True
                timer.start()
                self._log_timer = timer  # once started: a timer that never ran would silence every later count
        return ServerBusyError(message)

    def flush_refusals(self) -> None:
        """Log the refusals counted since the last line, if any (the timer; the server's stop)."""
        with self._lock:
            if self._log_timer is not None:
                self._log_timer.cancel()
                self._log_timer = None
            if self._refused:
                self._log_refusals()

    def _log_refusals(self) -> None:
        log.warning("calls refused as busy since the last such line: %d (the handler threads that calls "
                    "waiting for the model or a write and streams may hold were all held: raise --workers "
                    "for more clients at once)", self._refused)
        self._refused, self._refusals_logged_at = 0, time.monotonic()


def idle_limited(requests: Iterator[T], idle_s: float, stream: str) -> Iterator[T]:
    """The messages of a client stream (``stream`` names it in errors), waiting at most
    ``idle_s`` for each.

    gRPC's request iterator blocks until the client sends, closes or cancels: a client that
    opens a stream without a deadline and goes quiet would hold a stream slot and a handler
    thread forever. So a reader thread takes the messages and this generator waits on it with
    a timeout. The time spent on a message does not count: the reader reads ahead (a few
    messages, which bounds the memory), and the clock runs only while this side waits.
    """
    ahead: queue.Queue[object] = queue.Queue(maxsize=4)
    finished = threading.Event()

    def put(entry: object) -> bool:
        while not finished.is_set():  # the handler may have stopped reading (an error)
            try:
                ahead.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for request in requests:
                if not put(request):
                    return
            put(_STREAM_END)
        except Exception as e:  # gRPC's cancel (RpcError) or a malformed message: the handler raises it
            put(e)

    threading.Thread(target=read, name=f"pictor-{stream}-reader", daemon=True).start()
    try:
        while True:
            try:
                entry = ahead.get(timeout=idle_s)
            except queue.Empty:
                raise DeadlineExceededError(
                    f"the {stream} stream sent nothing for {idle_s:g} s and was ended: send each "
                    "message within that time of the last and close the stream after the last one "
                    "(the server's --upsert-idle-timeout sets the time)"
                ) from None
            if entry is _STREAM_END:
                return
            if isinstance(entry, grpc.RpcError):  # cancelled: by the client, its deadline, or the server stopping
                raise DeadlineExceededError(
                    f"the {stream} stream was cancelled before its last message (by the client, its "
                    "deadline, or the server shutting down)"
                ) from entry
            if isinstance(entry, Exception):
                raise entry
            yield cast(T, entry)
    finally:
        finished.set()  # the reader ends once gRPC ends the call (next() then raises)
