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
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar

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

    def _check_context(self) -> None:
        # grpc.aio would make the channel in a loop of its own, and every call from the running
        # one fail with "attached to a different loop".
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise InvalidRequestError("make a PictorAsyncClient inside a coroutine (`async with "
                                      "PictorAsyncClient(...)`): its gRPC channel belongs to the event loop that "
                                      "runs it; outside one, use PictorClient") from None

    async def __aenter__(self) -> PictorAsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running end with an error."""
        self._closed = True  # first: their CANCELLED is then known to be this close's
        for blocking in list(self._streams):
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
            # (its trailers are grpc.aio's Metadata, whose `in` looks at keys only: as pairs)
            raise self._error(e.code(), e.details() or "", tuple(e.trailing_metadata() or ()), method, request,
                              started, unknown_outcome) from None
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
        loop) or an async iterable (read in the event loop, an item at a time as the stream goes).

        Sent by a ``PictorClient`` of this client's settings, on a connection of its own, in a
        thread of its own: grpc.aio can lose the server's answer to a stream that the server ends while
        items are still being written (grpc/grpc#36066: a busy refusal came back as INTERNAL
        "Internal error from Core" in 1 of 40 refused streams), and a busy refusal must be known
        to be sent again. Cancelling the awaiting task cancels the stream."""
        self._check_open()
        sent = _ItemsFromLoop(asyncio.get_running_loop(), items) if isinstance(items, AsyncIterable) else items
        blocking = PictorClient(self.target, **self._settings)
        blocking._name = self._name  # (its errors name this client)
        self._streams.add(blocking)
        try:
            return await _in_a_thread(partial(blocking.upsert, sent))
        finally:
            if isinstance(sent, _ItemsFromLoop):
                sent.stop()  # (no more items taken: a cancelled call's would be lost)
            self._streams.discard(blocking)
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


class _ItemsFromLoop:
    """An async iterable's items for the thread that sends them, each taken in ``loop`` (which
    runs while the Upsert is awaited there) when the stream asks for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, items: AsyncIterable[UpsertItem]) -> None:
        self._loop, self._iterator = loop, aiter(items)
        self._taking: concurrent.futures.Future[UpsertItem] | None = None
        self._stopped = False

    def __iter__(self) -> Iterator[UpsertItem]:
        while not self._stopped:
            self._taking = asyncio.run_coroutine_threadsafe(self._take(), self._loop)
            if self._stopped:  # (stop() ran between the check and the line above: it saw the one before)
                self._taking.cancel()
            try:
                yield self._taking.result()
            except StopAsyncIteration:
                return

    async def _take(self) -> UpsertItem:
        return await anext(self._iterator)

    def stop(self) -> None:
        """Take no more items; cancel the taking of one under way (so that a cancelled Upsert
        does not take an item from its source that it will never send)."""
        self._stopped = True
        if self._taking is not None:
            self._taking.cancel()
