"""``_ReadWriteLock``: many readers or one writer, with no lock on the readers' path (an
index store's searches)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class _ReadWriteLock:
    """Many readers or one writer; a writer waiting holds new readers back.

    A reader registers in a list and enters unless a writer has raised its flag; then it
    steps back and queues on the gate, which a writer holds for its whole turn. ``append``,
    ``pop`` and the flag are single operations under the GIL, so the search hot path takes no
    lock at all. A writer takes the gate, raises the flag, then waits for the list to empty;
    a reader that registered after that check sees the flag and steps back, and the last
    reader out wakes the writer.
    """

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._inside: list[None] = []  # one entry per reader inside
        self._drained = threading.Condition(threading.Lock())
        self._writing = False

    def acquire_read(self) -> None:
        self._inside.append(None)
        if self._writing:  # rare: wait for the writer's turn to end
            self.release_read()
            with self._gate:
                self._inside.append(None)

    def release_read(self) -> None:
        self._inside.pop()
        if self._writing:  # rare: take the condition's lock only then
            with self._drained:
                self._drained.notify()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._gate:
            self._writing = True
            try:
                with self._drained:
                    # A reader that left between the flag and the check cannot be missed:
                    # it popped before the check, or sees the flag and notifies under the
                    # lock this thread only releases inside wait(); the timeout is a backstop.
                    while self._inside:
                        self._drained.wait(0.01)
                yield
            finally:
                self._writing = False
