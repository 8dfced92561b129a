"""PictorAsyncClient against real servers: the blocking client's answers and errors, from
coroutines, concurrently over one channel; busy refusals resent by its channel too."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, free_port, held_open

from pictor.client import PictorAsyncClient, PictorClient, UpsertItem
from pictor.config import ServerSettings
from pictor.errors import (
    InvalidRequestError,
    NotFoundError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    ServerUnavailableError,
)


def test_the_async_client_answers_as_the_blocking_one(server: ServerProcess, shared_gallery: Path) -> None:
    image = next(shared_gallery.rglob("*.png")).read_bytes()
    with PictorClient(server.target) as blocking:
        labels = blocking.classify(image, top_k=3).labels
        hits = blocking.search(image=image, k=4)
        info = blocking.info()

    async def calls() -> None:
        async with PictorAsyncClient(server.target, timeout=60) as client:
            # Concurrent calls over the one channel, each answered as the blocking client's.
            health, got_info, classified, found, embedded = await asyncio.gather(
                client.health(), client.info(), client.classify(image, top_k=3), client.search(image=image, k=4),
                client.embed([image, image]))
            assert health == "SERVING" and got_info == info
            assert [x.name for x in classified.labels] == [x.name for x in labels] and classified.source == "imagenet"
            assert [h.key for h in found] == [h.key for h in hits]
            assert len(embedded) == 2 and len(embedded[0]) == info.embedding_dim
            by_vector = await client.search(vector=embedded[0], k=4)
            assert [h.key for h in by_vector] == [h.key for h in hits]

            # Writes: a list and a generator, read back by key, by listing and by search.
            items = [UpsertItem(key=f"async/{i}", vector=embedded[0], label="async", attributes={"n": str(i)})
                     for i in range(3)]
            assert await client.upsert(items) == (3, 0)
            assert await client.upsert(it for it in items[:2]) == (0, 2)

            async def arriving() -> AsyncIterator[UpsertItem]:  # e.g. from an async source
                for it in items:
                    await asyncio.sleep(0)
                    yield it

            assert await client.upsert(arriving()) == (0, 3)
            stored, missing = await client.get(["async/0", "async/none"], vectors=True)
            assert [s.key for s in stored] == ["async/0"] and missing == ["async/none"]
            assert stored[0].vector is not None and stored[0].attributes == {"n": "0"}
            page, after = await client.list_items(limit=2, labels=["async"])
            assert [s.key for s in page] == ["async/0", "async/1"] and after == "async/1"
            listed = [s.key async for s in client.iter_items(labels=["async"], page=2)]
            assert listed == ["async/0", "async/1", "async/2"]
            filtered = await client.search(key="async/0", k=10, attributes={"n": "2"})
            assert [h.key for h in filtered] == ["async/2"]
            assert await client.delete(["async/0", "async/1", "async/2", "async/none"]) == (3, ["async/none"])
            # Nothing to send: answered here.
            assert await client.embed([]) == [] and await client.delete([]) == (0, [])
            assert await client.upsert([]) == (0, 0) and await client.get([]) == ([], [])

    asyncio.run(calls())


def test_the_async_client_raises_the_blocking_ones_errors(server: ServerProcess) -> None:
    async def calls() -> None:
        async with PictorAsyncClient(server.target, timeout=60) as client:
            with pytest.raises(InvalidRequestError, match="top_k must be between 1 and 1000, got 0"):
                await client.classify(b"x", top_k=0)  # refused before sending
            with pytest.raises(InvalidRequestError, match=r"INVALID_ARGUMENT"):
                await client.classify(b"not an image")  # refused by the server, which keeps answering
            with pytest.raises(NotFoundError, match="NOT_FOUND"):
                await client.search(key="no/such/key")
            with pytest.raises(InvalidRequestError, match="page must be between 1 and 1000, got 0"):
                client.iter_items(page=0)  # refused when asked for, not at the first page

            def failing() -> Iterator[UpsertItem]:
                yield UpsertItem(key="async/x", vector=[1.0] * 1280)
                raise ValueError("the caller's items broke")

            async def failing_later() -> AsyncIterator[UpsertItem]:
                for it in failing():
                    yield it

            for broken in (failing(), failing_later()):
                with pytest.raises(ValueError, match="the caller's items broke"):  # raised as it was
                    await client.upsert(broken)
            assert (await client.get(["async/x"]))[1] == ["async/x"]  # its chunk never ended: not written
            assert await client.health() == "SERVING"
            # An Upsert held open by its items: cancelled with its task.
            sent, release = threading.Event(), threading.Event()
            upsert = asyncio.create_task(client.upsert(held_open("async/held", release, sent)))
            assert await asyncio.to_thread(sent.wait, 30)
            upsert.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upsert
            release.set()
            assert (await client.get(["async/held"]))[1] == ["async/held"]  # its stream never ended
            # Closed under an Upsert (sent by a PictorClient of its own) and under a call: their
            # errors say so (grpc.aio's own CancelledError would read as this task's).
            sent, release = threading.Event(), threading.Event()
            upsert = asyncio.create_task(client.upsert(held_open("async/held", release, sent)))
            assert await asyncio.to_thread(sent.wait, 30)
            pending = asyncio.create_task(client.info())
            await asyncio.sleep(0)  # (sent)
            await client.close()
            release.set()
            for call in (upsert, pending):
                with pytest.raises(ServerUnavailableError, match=r"cancelled before its answer came .*: this "
                                                                 r"PictorAsyncClient was closed \(CANCELLED\)"):
                    await call
        with pytest.raises(InvalidRequestError, match="this PictorAsyncClient is closed; make a new one"):
            await client.info()

    async def unreachable() -> None:
        async with PictorAsyncClient(f"127.0.0.1:{free_port()}", timeout=5) as nowhere:
            with pytest.raises(ServerUnavailableError, match="cannot reach a Pictor server at 127.0.0.1"):
                await nowhere.info()
            with pytest.raises(ServerUnavailableError, match=r"cannot reach .*\(UNAVAILABLE\)$"):
                await nowhere.delete(["k"])  # never connected: nothing applied, and not said to be

    asyncio.run(calls())
    asyncio.run(unreachable())


def test_upserts_run_beside_the_programs_threads_and_stop_with_their_task(server: ServerProcess) -> None:
    """An Upsert is sent from a thread of its own: the event loop's default pool (here 2 threads)
    stays free for the program, and every Upsert runs at once. One cancelled takes no more items
    from its async source (they would be lost); a task that once caught a cancellation still
    gets the client's error when the client is closed under a call."""
    from concurrent.futures import ThreadPoolExecutor

    async def calls() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        async with PictorAsyncClient(server.target, timeout=60) as client:
            release = threading.Event()
            started = [threading.Event() for _ in range(4)]
            held = [asyncio.create_task(client.upsert(held_open(f"held/{i}", release, sent)))
                    for i, sent in enumerate(started)]
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"
            for sent in started:  # all four at once
                assert await asyncio.to_thread(sent.wait, 30)
            release.set()
            assert await asyncio.gather(*held) == [(1, 0)] * 4
            assert await client.delete([f"held/{i}" for i in range(4)]) == (4, [])

            queue: asyncio.Queue[UpsertItem | None] = asyncio.Queue()

            async def queued() -> AsyncIterator[UpsertItem]:
                while (item := await queue.get()) is not None:
                    yield item

            async def taken_up_to(count: int) -> asyncio.Task[tuple[int, int]]:
                """An Upsert of queued() that has taken ``count`` items and waits for more."""
                upsert = asyncio.create_task(client.upsert(queued()))
                for i in range(count):
                    queue.put_nowait(UpsertItem(key=f"queued/{i}", vector=[1.0] * 1280))
                while not queue.empty():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # (the stream now waits for the next item)
                return upsert

            upsert = await taken_up_to(1)
            queue.put_nowait(UpsertItem(key="queued/1", vector=[1.0] * 1280))
            upsert.cancel()  # as the item came
            with pytest.raises(asyncio.CancelledError):
                await upsert
            await asyncio.sleep(0.2)
            assert queue.qsize() == 1  # left for the program
            assert (await client.get(["queued/0", "queued/1"]))[1] == ["queued/0", "queued/1"]
            queue.get_nowait()
            upsert = await taken_up_to(2)
            queue.put_nowait(UpsertItem(key="queued/2", vector=[1.0] * 1280))
            await client.close()  # as the item came
            with pytest.raises(ServerUnavailableError, match=r"was closed \(CANCELLED\); none of the 2 items sent "):
                await upsert
            assert queue.qsize() == 1

        async def caught_a_cancellation_before(client: PictorAsyncClient) -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # (the task goes on: its cancelling() count stays 1)
            await client.embed([b"x" * 10_000_000] * 6)  # long enough to be closed under

        async def swallowing() -> AsyncIterator[UpsertItem]:  # (a source that takes a cancel for an item)
            while True:
                try:
                    item = await queue.get()
                except asyncio.CancelledError:
                    item = UpsertItem(key="swallowed", vector=[1.0] * 1280)
                if item is not None:
                    yield item

        async def upsert_after_a_caught_cancellation(client: PictorAsyncClient) -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
            await client.upsert(queued())

        async def upsert_swallowing(client: PictorAsyncClient) -> None:
            await client.upsert(swallowing())

        # (the call, and whether its task is cancelled once first: it catches that)
        for call, cancelled_before in ((caught_a_cancellation_before, True),
                                       (upsert_after_a_caught_cancellation, True), (upsert_swallowing, False)):
            async with PictorAsyncClient(server.target, timeout=60) as client:
                task = asyncio.create_task(call(client))
                await asyncio.sleep(0.05)
                if cancelled_before:
                    task.cancel()
                await asyncio.sleep(0.2)
                await client.close()
                # (the swallowing source's Upsert had not opened its stream yet: "is closed")
                with pytest.raises(PictorError, match="this PictorAsyncClient (was|is) closed"):
                    await asyncio.wait_for(task, 10)  # no hang

    asyncio.run(calls())

    # A KeyboardInterrupt or SystemExit from an async source is raised where the Upsert is
    # awaited, as from any other code of the task (and then ends asyncio.run).
    raised = []

    async def exits() -> None:
        async def source() -> AsyncIterator[UpsertItem]:
            yield UpsertItem(key="exit/0", vector=[1.0] * 1280)
            raise SystemExit(3)

        async with PictorAsyncClient(server.target, timeout=60) as client:
            try:
                await client.upsert(source())
            except BaseException as e:
                raised.append(e)
                raise

    with pytest.raises(SystemExit):
        asyncio.run(exits())
    assert [type(e) for e in raised] == [SystemExit]


def test_the_async_client_is_used_in_the_loop_it_was_made_in(server: ServerProcess) -> None:
    """grpc.aio ties a channel to an event loop: made elsewhere, every call failed with "attached
    to a different loop"."""
    with pytest.raises(InvalidRequestError, match="make a PictorAsyncClient inside a coroutine"):
        PictorAsyncClient(server.target)

    async def make() -> PictorAsyncClient:
        return PictorAsyncClient(server.target)

    async def info(client: PictorAsyncClient) -> None:
        await client.info()

    with pytest.raises(InvalidRequestError, match="this PictorAsyncClient was made in another event loop"):
        asyncio.run(info(asyncio.run(make())))


def test_the_async_client_resends_busy_refusals(built_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its channel carries PictorClient's retry policy (gRPC resends a busy call), and an Upsert
    stream refused as busy is sent again whole by the client itself."""
    from pictor.server.app import create_server
    from pictor.server.limits import HandlerThreads

    class Refusing(HandlerThreads):
        refusals = 0

        def stream(self, refused: str) -> contextlib._GeneratorContextManager[None, None, None]:
            if self.refusals:
                self.refusals -= 1
                raise ServerBusyError(f"the server is busy; {refused}")
            return super().stream(refused)

    threads = Refusing(8)
    server, port, engine = create_server(ServerSettings(index=str(built_index), port=0, device="cpu"), threads)
    real_info = engine.info
    info_refusals: list[PictorError] = [ServerBusyError("the server is busy")] * 2

    def info() -> object:
        if info_refusals:
            raise info_refusals.pop()
        return real_info()

    monkeypatch.setattr(engine, "info", info)
    server.start()

    async def calls() -> None:
        async with PictorAsyncClient(f"localhost:{port}", timeout=8) as client:
            assert (await client.info()).index_size == 12 and not info_refusals  # refused twice, then answered
            items = [UpsertItem(key=f"busy/{i}", vector=[float(i + 1)] * 1280) for i in range(100)]
            threads.refusals = 1
            assert await client.upsert(items) == (100, 0) and threads.refusals == 0
            assert (await client.get([it.key for it in items]))[1] == []
            threads.refusals = 9
            with pytest.raises(ServerBusyError, match=r"refused 5 times: the client sent it again"):
                await client.upsert(items)
            threads.refusals = 0
            info_refusals[:] = [ResourceExhaustedError("the disk is full")]
            with pytest.raises(ResourceExhaustedError, match="the disk is full") as full:
                await client.info()
            assert not isinstance(full.value, ServerBusyError)  # not resent: the server said so

    try:
        asyncio.run(calls())
    finally:
        server.stop(None)
        engine.close()
