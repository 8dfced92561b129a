"""The asyncio client: ``PictorClient``'s calls as coroutines, over ``grpc.aio``.

Example::

    import asyncio
    from pictor.client import PictorAsyncClient

    async def main() -> None:
        async with PictorAsyncClient("localhost:50051") as client:
            image = open("daisy.jpg", "rb").read()
            answers = await asyncio.gather(client.classify(image), client.search(image=image, k=5))

    asyncio.run(main())

Requests are built and checked, and answers read, by the same code as ``PictorClient``'s
(``_ClientBase``): the same arguments, results, errors and resends of busy refusals.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sized
from functools import partial
from typing import Any, TypeVar, cast

import grpc
import grpc.aio

from pictor.api import DEFAULT_K, DEFAULT_TOP_K, MAX_LIST, ServerInfo, StoredItem
from pictor.client.client import (
    _DELETE_MAY_HAVE_APPLIED,
    Classification,
    Hit,
    ImageData,
    PictorClient,
    UpsertItem,
    _classification,
    _ClientBase,
    _embeddings,
    _health_status,
    _hits,
    _page,
    _server_info,
    _stored_items,
)
from pictor.errors import InvalidRequestError
from pictor.v1 import pictor_pb2 as pb

R = TypeVar("R")


class PictorAsyncClient(_ClientBase):
    """Calls a Pictor server from asyncio code: each method of ``PictorClient`` (the same
    arguments, results and ``pictor.errors`` types) as a coroutine, and ``iter_items`` as an
    async iterator. Make it inside a running event loop (``async with``), and use it in that loop
    only: its gRPC channel belongs to it. Calls may run concurrently (``asyncio.gather``) over
    the one channel.

    The constructor's arguments are ``PictorClient``'s; ``upsert`` also takes an async iterable."""

    _grpc = grpc.aio

    def _begin(self) -> None:
        # grpc.aio would make the channel in a loop of its own, and every call from the running
        # one fail with "attached to a different loop".
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise InvalidRequestError("make a PictorAsyncClient inside a coroutine (`async with "
                                      "PictorAsyncClient(...)`): its gRPC channel belongs to the event loop that "
                                      "runs it; outside one, use PictorClient") from None
        # The Upserts under way: each its PictorClient, and what hands it an async source's items.
        self._streams: dict[PictorClient, _Handoff | None] = {}

    async def __aenter__(self) -> PictorAsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running end with an error."""
        self._closed = True  # first: their CANCELLED is then known to be this close's
        for blocking, handoff in list(self._streams.items()):
            if handoff is not None:
                handoff.interrupt()  # now: an item that comes before the stream's end is known stays in its source
            blocking.close()
        await self._channel.close()

    async def _call(self, method: Callable[..., Any], request: Any, *, started: float | None = None,
                    unknown_outcome: str = "") -> Any:
        """``await method(request)``, its gRPC errors as Pictor's (``_ClientBase._error``)."""
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequestError("this PictorAsyncClient was made in another event loop; make one in this "
                                      "loop (its gRPC channel belongs to the loop it was made in)")
        started, timeout = self._time_left(started)
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:  # (grpc.aio.AioRpcError)
            raise self._rpc_error(e, method, request, started, unknown_outcome) from None
        except asyncio.CancelledError:
            if not self._closed or (task is not None and task.cancelling() > cancels):
                raise  # this task was cancelled during the call (the count: it may have caught one before)
            # grpc.aio cancelled the call itself, as this client was closed: not a CancelledError,
            # which would read as this task's own cancellation. (gRPC's words, as PictorClient's.)
            raise self._error(grpc.StatusCode.CANCELLED, "Channel closed!", (), method, request, started,
                              unknown_outcome) from None

    async def health(self, service: str = "") -> str:
        """As ``PictorClient.health``."""
        return _health_status(await self._call(self._health.Check, self._health_request(service)))

    async def classify(self, image: ImageData, *, top_k: int = DEFAULT_TOP_K, classifier: str = "default",
                       neighbors: int = 0) -> Classification:
        """As ``PictorClient.classify``."""
        request = self._classify_request(image, top_k, classifier, neighbors)
        return _classification(await self._call(self._stub.Classify, request))

    async def search(self, *, image: ImageData | None = None, key: str | None = None,
                     vector: Iterable[float] | None = None, k: int = DEFAULT_K,
                     labels: Iterable[str] | None = (), attributes: Mapping[str, str] | None = None,
                     nprobe: int = 0, ef_search: int = 0) -> list[Hit]:
        """As ``PictorClient.search``."""
        request = self._search_request(image, key, vector, k, labels, attributes, nprobe, ef_search)
        return _hits(await self._call(self._stub.Search, request))

    async def embed(self, images: Iterable[ImageData]) -> list[list[float]]:
        """As ``PictorClient.embed``."""
        request = self._embed_request(images)
        return [] if request is None else _embeddings(await self._call(self._stub.Embed, request))

    async def upsert(self, items: Iterable[UpsertItem] | AsyncIterable[UpsertItem]) -> tuple[int, int]:
        """As ``PictorClient.upsert``: (inserted, replaced) once all are durable. ``items``: an
        iterable (read in another thread: a generator reading files does not hold up the event
        loop) or an async iterable (read by the awaiting task, an item at a time as the stream asks for
        it: what a cancel or a close leaves unread stays in the source).

        Sent by a ``PictorClient`` of this client's settings, on a connection of its own, in a
        thread of its own: grpc.aio can lose the server's answer to a stream that the server ends while
        items are still being written (grpc/grpc#36066: a busy refusal came back as INTERNAL
        "Internal error from Core" in 1 of 40 refused streams), and a busy refusal must be known
        to be sent again. Cancelling the awaiting task cancels the stream."""
        self._check_open()
        if isinstance(items, Sized) and not len(items):  # (what PictorClient answers, without its connection)
            return 0, 0
        blocking = PictorClient(self.target, **self._settings)
        blocking._name = self._name  # (its errors name this client)
        sent = _Handoff(asyncio.get_running_loop(), items) if isinstance(items, AsyncIterable) else items
        self._streams[blocking] = sent if isinstance(sent, _Handoff) else None
        sending = _in_a_thread(partial(blocking.upsert, sent))
        sending.add_done_callback(_retrieved)  # (when this task ends first, its error is nobody's)
        try:
            if isinstance(sent, _Handoff):
                await sent.pump(sending)
            return await sending
        finally:
            if isinstance(sent, _Handoff):
                sent.stop()
            self._streams.pop(blocking, None)
            blocking.close()  # (its stream has ended, or is cancelled with this task)

    async def delete(self, keys: Iterable[str]) -> tuple[int, list[str]]:
        """As ``PictorClient.delete``: (deleted, keys that did not exist)."""
        if (request := self._delete_request(keys)) is None:
            return 0, []
        r = await self._call(self._stub.Delete, request, unknown_outcome=_DELETE_MAY_HAVE_APPLIED)
        return r.deleted, list(r.missing)

    async def get(self, keys: Iterable[str], *, vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        """As ``PictorClient.get``: (items, keys the index does not hold)."""
        if (request := self._get_request(keys, vectors)) is None:
            return [], []
        return _stored_items(await self._call(self._stub.Get, request))

    async def list_items(self, after: str = "", limit: int = MAX_LIST, *, labels: Iterable[str] | None = (),
                         attributes: Mapping[str, str] | None = None) -> tuple[list[StoredItem], str]:
        """As ``PictorClient.list_items``: (items, next)."""
        return _page(await self._call(self._stub.List, self._list_request(after, limit, labels, attributes)))

    def iter_items(self, *, labels: Iterable[str] | None = (), attributes: Mapping[str, str] | None = None,
                   page: int = MAX_LIST, after: str = "") -> AsyncIterator[StoredItem]:
        """As ``PictorClient.iter_items``, for ``async for``; bad arguments are refused here."""
        return self._pages(self._pages_filter(labels, attributes, page), attributes, page, after)

    async def _pages(self, labels: list[str], attributes: Mapping[str, str] | None, page: int, after: str
                     ) -> AsyncIterator[StoredItem]:
        while True:
            items, after = await self.list_items(after, page, labels=labels, attributes=attributes)
            for item in items:
                yield item
            if not after:
                return

    async def info(self) -> ServerInfo:
        """As ``PictorClient.info``."""
        return _server_info(await self._call(self._stub.Info, pb.InfoRequest()))


def _in_a_thread(call: Callable[[], R]) -> asyncio.Future[R]:
    """``call()`` in a thread of its own, awaitable: not in the event loop's default pool, whose
    few threads (6 on 2 cores) the program's other work shares (12 Upserts there took 3x as long
    as one, and held up every ``asyncio.to_thread`` meanwhile)."""
    done: concurrent.futures.Future[R] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(call())
        except BaseException as e:  # (raised where it is awaited)
            done.set_exception(e)

    threading.Thread(target=run, name="pictor-upsert", daemon=True).start()
    return asyncio.wrap_future(done)


def _retrieved(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


class _Stopped(Exception):
    """Raised to the sending thread for its next item when the Upsert ended in its task (its
    source raised, or it was cancelled): the stream is then cancelled, never ended (an ended
    stream's last chunk would be written)."""


_END = object()  # the source has no more items
_STOP = object()


class _Handoff:
    """An async iterable's items for the thread that sends them, each taken in the Upsert's own
    task (``pump``) only once that thread asks for the next. So a cancelled Upsert leaves every
    item it did not ask for in its source (an asyncio.Queue keeps one put as the cancel came: a
    task of its own taking them had taken it, and it was lost), and an error from the source,
    a KeyboardInterrupt too, is raised where the Upsert is awaited, as it was."""

    def __init__(self, loop: asyncio.AbstractEventLoop, items: AsyncIterable[UpsertItem]) -> None:
        self._loop, self._source = loop, items
        self._wanted = asyncio.Event()
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._task: asyncio.Task[Any] | None = None  # the Upsert's, while it pumps
        self._interrupted = False

    def __iter__(self) -> Iterator[UpsertItem]:  # (in the sending thread)
        while True:
            self._loop.call_soon_threadsafe(self._wanted.set)
            item = self._items.get()
            if item is _END:
                return
            if item is _STOP:
                raise _Stopped("the Upsert ended in its task")
            yield cast(UpsertItem, item)

    def stop(self) -> None:
        """The Upsert ended in its task: the thread's next item, or the one it waits for, raises."""
        self._items.put(_STOP)

    async def pump(self, sending: asyncio.Future[Any]) -> None:
        """Hand over items as the thread asks for them until the source ends, or the sending
        does (a refusal; this client closed: ``interrupt``): then this task's wait for the
        source is cancelled, and the cancel taken back."""
        self._task = task = asyncio.current_task()
        assert task is not None  # (awaited in one)
        cancels = task.cancelling()  # (a task may have caught cancels before)
        sending.add_done_callback(lambda _: self.interrupt())
        iterator = aiter(self._source)
        try:
            while not self._interrupted:  # (a source may swallow the cancel)
                await self._wanted.wait()
                self._wanted.clear()
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    self._items.put(_END)
                    return
                self._items.put(item)
        except asyncio.CancelledError:
            if not self._interrupted or task.cancelling() > cancels + 1:  # the caller's cancel (too)
                raise
        finally:
            self._task = None
            if self._interrupted:
                task.uncancel()  # the cancel interrupt() made, delivered by now

    def interrupt(self) -> None:
        """End ``pump`` (in the event loop's thread): the sending has ended."""
        if self._task is not None and not self._interrupted:  # (not once the pump returned: the task has gone on)
            self._interrupted = True
            self._task.cancel()
