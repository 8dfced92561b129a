"""What a server option costs a call: `serve --metrics-port`, TLS (`--tls-cert`/`--tls-key`) or
mutual TLS (`--tls-client-ca` too). The same calls against two real servers over the sample
gallery, one without the option and one with, in alternating rounds (so drift hits both alike).

One client calls each server in turn, one call at a time: a health Check (the cheapest call,
where the option's share is largest), a Search by vector and a Classify (a forward pass); and
a health Check on a new connection each time (what a TLS handshake adds). The table gives the
median milliseconds per call of each kind on each server and their difference; with metrics,
then how long a scrape of /metrics takes and how large it is. TLS uses the test certificates
of tests/data/tls (ECDSA P-256).

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/server_options.py --option metrics --rounds 20
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

from pictor.client import ClientTLS, PictorClient

from common import ROOT, SAMPLE, free_port, machine_line, parser, served

CERTS = ROOT / "tests" / "data" / "tls"
SERVER_TLS = ["--tls-cert", str(CERTS / "server.pem"), "--tls-key", str(CERTS / "server.key")]
CLIENT_CERT = {"cert": str(CERTS / "client.pem"), "key": str(CERTS / "client.key")}


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of each of ``n`` calls."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        took.append(1000 * (time.perf_counter() - start))
    return took


def option(name: str, metrics_port: int) -> tuple[list[str], ClientTLS | bool]:
    """The server flags of option ``name``, and how a client calls a server with them."""
    if name == "metrics":
        return ["--metrics-port", str(metrics_port)], False
    if name == "tls":
        return SERVER_TLS, ClientTLS(ca=str(CERTS / "ca.pem"))
    return [*SERVER_TLS, "--tls-client-ca", str(CERTS / "ca.pem")], ClientTLS(ca=str(CERTS / "ca.pem"), **CLIENT_CERT)


def health_on_a_new_connection(target: str, tls: ClientTLS | bool) -> None:
    with PictorClient(target, timeout=60, tls=tls) as client:
        client.health()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--option", choices=("metrics", "tls", "mtls"), default="metrics",
                    help="what the second server has that the first has not")
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds on the two servers")
    ap.add_argument("--calls", type=int, default=50,
                    help="calls of each cheap kind per round (Classify and new connections: a fifth)")
    args = ap.parse_args()
    print(machine_line())
    metrics_port = free_port()
    flags, tls = option(args.option, metrics_port)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        plain_dir, optioned_dir = Path(tmp, "plain"), Path(tmp, "optioned")
        plain_dir.mkdir()
        optioned_dir.mkdir()
        # Each its own index of the sample gallery: a served index is open in one process only.
        servers = {"without": (stack.enter_context(served(plain_dir))[0], False),
                   "with": (stack.enter_context(served(optioned_dir, flags, tls=tls))[0], tls)}
        image = next((SAMPLE / "queries").glob("*.png")).read_bytes()
        took: dict[tuple[str, str], list[float]] = {}
        clients = {name: stack.enter_context(PictorClient(target, timeout=60, tls=its_tls))
                   for name, (target, its_tls) in servers.items()}
        first = clients["without"].list_items(limit=1)[0][0].key
        vector = clients["without"].get([first], vectors=True)[0][0].vector or []
        for _ in range(args.rounds):
            for name, client in clients.items():
                kinds: dict[str, tuple[Callable[[], object], int]] = {
                    "health": (client.health, args.calls),
                    "health, new connection": (partial(health_on_a_new_connection, *servers[name]),
                                               max(1, args.calls // 5)),
                    "search by vector": (partial(client.search, vector=vector, k=5), args.calls),
                    "classify": (partial(client.classify, image), max(1, args.calls // 5)),
                }
                for kind, (call, n) in kinds.items():
                    took.setdefault((kind, name), []).extend(timed(call, n))
        scrape_ms, size = [], 0
        for _ in range(20 if args.option == "metrics" else 0):
            start = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
                size = len(answer.read())
            scrape_ms.append(1000 * (time.perf_counter() - start))
    print(f"\n{args.rounds} alternating rounds, one client, one call at a time\n")
    print(f"| call | n per server | without {args.option} p50 ms | with {args.option} p50 ms | difference ms |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("health", "health, new connection", "search by vector", "classify"):
        without, with_ = np.median(took[(kind, "without")]), np.median(took[(kind, "with")])
        print(f"| {kind} | {len(took[(kind, 'with')])} | {without:.3f} | {with_:.3f} | {with_ - without:+.3f} |")
    if scrape_ms:
        print(f"\na scrape of /metrics: p50 {np.median(scrape_ms):.1f} ms, {size:,} bytes")


if __name__ == "__main__":
    main()
