"""The blocking and the asyncio client side by side: the same calls to one real server over the
sample gallery, one at a time and `--concurrency` at once (threads sharing one PictorClient, or
coroutines sharing one PictorAsyncClient).

Calls: a Search by vector (cheap on the server: the client's own cost shows most), a Classify
(a forward pass: the server's model is the limit) and an Upsert of `--upsert-items` vectors
(PictorAsyncClient sends it through a PictorClient of its own, on a new connection, in a thread
of its own). The table gives calls per second and the median milliseconds per call. The bench and
the server share the machine's cores.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/clients.py
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pictor.client import PictorAsyncClient, PictorClient, UpsertItem

from common import SAMPLE, machine_line, parser, served


def blocking_run(call: Callable[[], object], n: int, concurrency: int) -> tuple[float, list[float]]:
    """(seconds in all, milliseconds of each call) for ``n`` calls, ``concurrency`` threads at once."""
    def one(_: int) -> float:
        start = time.perf_counter()
        call()
        return 1000 * (time.perf_counter() - start)

    start = time.perf_counter()
    if concurrency == 1:
        took = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            took = list(pool.map(one, range(n)))
    return time.perf_counter() - start, took


async def async_run(call: Callable[[], Awaitable[object]], n: int, concurrency: int) -> tuple[float, list[float]]:
    """As ``blocking_run``, with ``concurrency`` coroutines taking calls in turn."""
    took: list[float] = []
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            start = time.perf_counter()
            await call()
            took.append(1000 * (time.perf_counter() - start))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, took


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--calls", type=int, default=400, help="Search calls per row (Classify and Upsert: a tenth)")
    ap.add_argument("--concurrency", type=int, default=8, help="calls at once in the concurrent rows")
    ap.add_argument("--upsert-items", type=int, default=64, help="vectors per Upsert call")
    args = ap.parse_args()
    print(machine_line())
    image = next((SAMPLE / "queries").glob("*.png")).read_bytes()
    rows: list[tuple[str, str, int, int, float, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with served(Path(tmp)) as (address, _, _), PictorClient(address, timeout=60) as blocking:
            first = blocking.list_items(limit=1)[0][0].key
            vector = blocking.get([first], vectors=True)[0][0].vector or []
            items = [UpsertItem(key=f"bench/{i}", vector=vector) for i in range(args.upsert_items)]
            kinds = {"search by vector": args.calls, "classify": max(1, args.calls // 10),
                     f"upsert of {args.upsert_items}": max(1, args.calls // 10)}

            def calls_of(client: Any) -> dict[str, Callable[[], Any]]:
                """Each kind's call on ``client`` (a PictorAsyncClient's return awaitables)."""
                return dict(zip(kinds, (lambda: client.search(vector=vector, k=5), lambda: client.classify(image),
                                        lambda: client.upsert(items)), strict=True))

            async def async_rows() -> None:
                async with PictorAsyncClient(address, timeout=60) as client:
                    for kind, call in calls_of(client).items():
                        for concurrency in (1, args.concurrency):
                            rows.append((kind, "PictorAsyncClient", concurrency, kinds[kind],
                                         *await async_run(call, kinds[kind], concurrency)))

            for kind, call in calls_of(blocking).items():
                call()  # (the connection made, the server's first call of each kind done)
                for concurrency in (1, args.concurrency):
                    rows.append((kind, "PictorClient", concurrency, kinds[kind],
                                 *blocking_run(call, kinds[kind], concurrency)))
            asyncio.run(async_rows())
    print("\n| call | client | at once | calls | calls/s | p50 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, client_name, concurrency, n, seconds, took in sorted(rows, key=lambda r: (list(kinds).index(r[0]), r[2])):
        print(f"| {kind} | {client_name} | {concurrency} | {n} | {n / seconds:,.0f} | {statistics.median(took):.2f} |")


if __name__ == "__main__":
    main()
