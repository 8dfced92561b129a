"""What `serve --metrics-port` costs a call: the same calls against two real servers over the
sample gallery, one without metrics and one with, in alternating rounds (so drift hits both alike).

One client calls each server in turn, one call at a time: a health Check (the cheapest call,
where the interceptor's share is largest), a Search by vector and a Classify (a forward pass).
The table gives the median milliseconds per call of each kind on each server and their
difference; then how long a scrape of /metrics takes and how large it is.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/metrics.py --rounds 20
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from pictor.client import PictorClient

from common import SAMPLE, free_port, machine_line, parser, served


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of each of ``n`` calls."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        took.append(1000 * (time.perf_counter() - start))
    return took


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds on the two servers")
    ap.add_argument("--calls", type=int, default=50, help="calls of each cheap kind per round (Classify: a fifth)")
    args = ap.parse_args()
    print(machine_line())
    metrics_port = free_port()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        plain_dir, metered_dir = Path(tmp, "plain"), Path(tmp, "metered")
        plain_dir.mkdir()
        metered_dir.mkdir()
        # Each its own index of the sample gallery: a served index is open in one process only.
        plain, _, _ = stack.enter_context(served(plain_dir))
        metered, _, _ = stack.enter_context(served(metered_dir, ["--metrics-port", str(metrics_port)]))
        image = next((SAMPLE / "queries").glob("*.png")).read_bytes()
        took: dict[tuple[str, str], list[float]] = {}
        clients = {name: stack.enter_context(PictorClient(target, timeout=60))
                   for name, target in (("without", plain), ("with", metered))}
        first = clients["without"].list_items(limit=1)[0][0].key
        vector = clients["without"].get([first], vectors=True)[0][0].vector or []
        for _ in range(args.rounds):
            for name, client in clients.items():
                kinds: dict[str, tuple[Callable[[], object], int]] = {
                    "health": (client.health, args.calls),
                    "search by vector": (partial(client.search, vector=vector, k=5), args.calls),
                    "classify": (partial(client.classify, image), max(1, args.calls // 5)),
                }
                for kind, (call, n) in kinds.items():
                    took.setdefault((kind, name), []).extend(timed(call, n))
        scrape_ms, size = [], 0
        for _ in range(20):
            start = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
                size = len(answer.read())
            scrape_ms.append(1000 * (time.perf_counter() - start))
    print(f"\n{args.rounds} alternating rounds, one client, one call at a time\n")
    print("| call | n per server | without metrics p50 ms | with metrics p50 ms | difference ms |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("health", "search by vector", "classify"):
        without, with_ = np.median(took[(kind, "without")]), np.median(took[(kind, "with")])
        print(f"| {kind} | {len(took[(kind, 'with')])} | {without:.3f} | {with_:.3f} | {with_ - without:+.3f} |")
    print(f"\na scrape of /metrics: p50 {np.median(scrape_ms):.1f} ms, {size:,} bytes")


if __name__ == "__main__":
    main()
