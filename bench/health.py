"""Health under load: how long a health check and a lookup (Search by vector) take while many
clients classify without pause, against a real `pictor serve`.

Calls that run the model wait for one forward pass at a time, each holding a handler thread;
the server keeps one thread for health checks and lookups and refuses a model call that would
take it (RESOURCE_EXHAUSTED, "busy"). The flood's clients run in a process of their own, each
sending Classify again as soon as it is answered or refused; the prober, in this process, sends
a health Check and a Search every 0.1 s, first with the server idle, then during the flood. The
flood's clients are PictorClients, which send a call refused as busy again after a wait
(``--attempts`` in all, gRPC's retry policy); with ``--attempts 1`` a refused call is not sent
again, the loop sends the next at once: the worst case for the server.
Then a burst, what a user's batch job sees: ``--burst-threads`` threads of one PictorClient
(timeout 60 s, ``--attempts``) send ``--burst-calls`` Classify calls in all, as fast as they are
answered; how many still fail as busy after the client's resends, and how long calls took.
Without an ``--index`` the bundled sample gallery is indexed first.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/health.py --clients 64
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pictor.client import PictorClient
from pictor.client.client import MAX_ATTEMPTS
from pictor.errors import PictorError

from common import SAMPLE, machine_line, parser, served


def flood(target: str, clients: int, attempts: int, seconds: float, image: bytes, out: mp.Queue) -> None:
    """``clients`` threads classifying ``image`` in a loop for ``seconds``; puts the outcome counts."""
    counts: Counter[str] = Counter()
    end = time.monotonic() + seconds

    def client_loop() -> None:
        with PictorClient(target, timeout=60, max_attempts=attempts) as client:
            while time.monotonic() < end:
                try:
                    client.classify(image)
                    counts["OK"] += 1
                except PictorError as e:
                    counts[type(e).__name__] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(dict(counts))


def probe(client: PictorClient, vector: list[float], seconds: float) -> dict[str, list[float]]:
    """Milliseconds of each health Check and Search by vector, one of each every 0.1 s."""
    took: dict[str, list[float]] = {"health": [], "search": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, call in (("health", client.health), ("search", lambda: client.search(vector=vector, k=5))):
            start = time.perf_counter()
            call()
            took[name].append(1000 * (time.perf_counter() - start))
        time.sleep(0.1)
    return took


def burst(target: str, threads: int, calls: int, attempts: int, image: bytes) -> tuple[Counter[str], list[float], float]:
    """Outcome counts, seconds per call, and the wall time of ``calls`` Classify calls sent by
    ``threads`` threads sharing one client."""
    counts: Counter[str] = Counter()
    took: list[float] = []

    def one(_: int) -> None:
        start = time.monotonic()
        try:
            client.classify(image)
            counts["OK"] += 1
        except PictorError as e:
            counts[type(e).__name__] += 1
        took.append(time.monotonic() - start)

    with PictorClient(target, timeout=60, max_attempts=attempts) as client:
        start = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(calls)))
        return counts, took, time.monotonic() - start


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--clients", type=int, default=64, help="classifying clients of the flood")
    ap.add_argument("--workers", type=int, default=8, help="the server's handler threads (serve --workers)")
    ap.add_argument("--attempts", type=int, default=MAX_ATTEMPTS,
                    help="times in all a flood client sends a call refused as busy (PictorClient's max_attempts)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    ap.add_argument("--burst-threads", type=int, default=32, help="threads of the burst's one client")
    ap.add_argument("--burst-calls", type=int, default=320, help="Classify calls of the burst, in all")
    ap.add_argument("--index", type=Path, help="index to serve (default: the sample gallery, indexed first)")
    args = ap.parse_args()
    if args.seconds <= 4:  # the probe samples the flood from 2 s in to 2 s before its end
        ap.error("--seconds must be more than 4")
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp, served(Path(tmp), ["--workers", str(args.workers)],
                                                      args.index) as (target, _, _):
        with PictorClient(target, timeout=30) as client:
            first = client.list_items(limit=1)[0][0].key
            vector = client.get([first], vectors=True)[0][0].vector or []
            image = next((SAMPLE / "queries").glob("*.png")).read_bytes()
            idle = probe(client, vector, 5.0)
            outcome: mp.Queue = mp.get_context("spawn").Queue()
            flooder = mp.get_context("spawn").Process(
                target=flood, args=(target, args.clients, args.attempts, args.seconds, image, outcome))
            flooder.start()
            time.sleep(2.0)  # the flood under way
            loaded = probe(client, vector, args.seconds - 4.0)
            counts = outcome.get()
            flooder.join()
            time.sleep(2.0)  # the flood's refusals drained
            burst_counts, burst_took, burst_s = burst(target, args.burst_threads, args.burst_calls,
                                                      args.attempts, image)
    print(f"\n{args.clients} clients classifying in a loop for {args.seconds:g} s, each call sent at most "
          f"{args.attempts} times, serve --workers {args.workers}; their calls: {counts}\n")
    print("| call | server | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---:|---:|---:|---:|")
    for phase, took in (("idle", idle), ("flooded", loaded)):
        for name, ms in took.items():
            print(f"| {name} | {phase} | {len(ms)} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} | "
                  f"{max(ms):.1f} |")
    print(f"\nburst: {args.burst_threads} threads of one client, {args.burst_calls} Classify calls, each sent at "
          f"most {args.attempts} times: {dict(burst_counts)} in {burst_s:.1f} s; seconds per call p50 "
          f"{np.percentile(burst_took, 50):.2f}, p99 {np.percentile(burst_took, 99):.2f}, max {max(burst_took):.2f}")


if __name__ == "__main__":
    main()
