"""Soak: a real `pictor serve` under a steady mix of every call for a long time, watched for
what leaks or drifts, with a check at the end that every acknowledged write is in the index.

Threads of one PictorClient in this process, over the sample gallery (indexed first):
``--readers`` threads send Classify, Search (by image, key and vector), Get, List and Info in a
random mix; one writer upserts (a vector, or an image the server embeds) and deletes keys
under ``soak/``, recording what each acknowledged call left; one thread sends calls that must
fail (undecodable and truncated images, a vector of the wrong dim, an unknown key) and
checks that each is refused as a bad request or a missing key; a prober sends a health Check
every 0.2 s. Every ``--sample-every`` seconds a row: calls answered, the server's resident
memory, threads and open files, the size of its SQLite write-ahead log and of the whole index
folder, and the health checks' p99. At the end every ``soak/`` key is read back (present with
the vector and attributes last written and found by a search for that vector, or absent when
last deleted), through the server and again from the index opened anew once the server has
stopped with SIGTERM (its exit status and how long it took); the server's log is searched for
tracebacks. Exits 1 when anything was wrong: an unexpected error, a wrong key, a traceback, a
bad exit.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/soak.py --seconds 900
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pictor.client import PictorClient, UpsertItem
from pictor.core.store import IndexStore
from pictor.errors import InvalidRequestError, NotFoundError, PictorError

from common import SAMPLE, machine_line, parser, served

WRITE_KEYS = 64  # soak/0 .. soak/63, written and deleted over and over
Written = tuple[np.ndarray, dict[str, str]]  # what an acknowledged upsert left: vector, attributes


class Tally:
    """Per kind of call: milliseconds of the answered ones and the errors, by type."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.took: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)

    def call(self, kind: str, fn: Callable[[], object], expect: tuple[type[PictorError], ...] = ()) -> object:
        """Runs ``fn``; with ``expect``, answering at all is the error. Returns its result (None
        when it raised)."""
        start = time.perf_counter()
        try:
            result = fn()
        except PictorError as e:
            with self.lock:
                self.errors[kind]["expected" if isinstance(e, expect) else type(e).__name__] += 1
            return None
        with self.lock:
            self.took[kind].append(1000 * (time.perf_counter() - start))
            if expect:
                self.errors[kind]["answered, should have failed"] += 1
        return result

    def answered(self) -> int:
        with self.lock:
            return sum(map(len, self.took.values()))

    def unexpected(self) -> int:
        with self.lock:
            return sum(n for errors in self.errors.values() for name, n in errors.items() if name != "expected")


def reader(client: PictorClient, tally: Tally, images: list[bytes], keys: list[str], vectors: list[list[float]],
           stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("Classify", lambda: client.classify(rng.choice(images))),
        ("Search by image", lambda: client.search(image=rng.choice(images), k=10)),
        ("Search by key", lambda: client.search(key=rng.choice(keys), k=10)),
        ("Search by vector", lambda: client.search(vector=rng.choice(vectors), k=10)),
        ("Get", lambda: client.get(rng.sample(keys, 5), vectors=True)),
        ("List", lambda: client.list_items(after=rng.choice(keys), limit=50)),
        ("Info", client.info),
    ]
    while not stop.is_set():
        kind, fn = rng.choice(calls)
        tally.call(kind, fn)


def writer(client: PictorClient, tally: Tally, images: list[bytes], embeddings: list[np.ndarray],
           truth: dict[str, Written | None], unsure: set[str], stop: threading.Event, seed: int) -> None:
    """Upserts and deletes ``soak/`` keys; ``truth`` holds what each acknowledged call left
    (vector and attributes; None: deleted), ``unsure`` the keys of calls that failed (they may
    or may not have been applied). ``embeddings``: each image's, as Embed answered it alone
    (what Upsert stores)."""
    dim = len(embeddings[0])
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        key = f"soak/{rng.integers(WRITE_KEYS)}"
        after: Written | None
        call: Callable[[], object]
        if (roll := rng.random()) < 0.3:
            kind, call, after = "Delete", partial(client.delete, [key]), None
        elif roll < 0.45:  # an image, which the server embeds
            i = int(rng.integers(len(images)))
            after = (embeddings[i], {})
            kind, call = "Upsert image", partial(client.upsert, [UpsertItem(key, image=images[i], label="soak")])
        else:
            vector = rng.standard_normal(dim).astype(np.float32)
            after = (vector / np.linalg.norm(vector), {"n": str(rng.integers(1000))})
            item = UpsertItem(key, vector=after[0], label="soak", attributes=after[1])
            kind, call = "Upsert vector", partial(client.upsert, [item])
        if tally.call(kind, call) is None:
            unsure.add(key)
        else:
            truth[key] = after


def bad_caller(client: PictorClient, tally: Tally, image: bytes, dim: int, stop: threading.Event) -> None:
    """Calls that must be refused: each answered one, or refused otherwise, counts as unexpected."""
    bad = (InvalidRequestError,)
    calls: list[tuple[str, Callable[[], object], tuple[type[PictorError], ...]]] = [
        ("bad: not an image", lambda: client.classify(b"not an image" * 100), bad),
        ("bad: truncated JPEG", lambda: client.classify(image[: len(image) // 3]), bad),
        ("bad: wrong dim", lambda: client.search(vector=[0.1] * (dim + 1)), bad),
        ("bad: unknown key", lambda: client.search(key="soak/no such key"), (NotFoundError,)),
    ]
    while not stop.is_set():
        for kind, fn, expect in calls:
            tally.call(kind, fn, expect)
        time.sleep(0.05)


def prober(client: PictorClient, took: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            client.health()
            took.append(1000 * (time.perf_counter() - start))
        except PictorError:
            took.append(float("inf"))  # a failed check shows as an infinite p99
        stop.wait(0.2)


def process_row(pid: int, index: Path) -> tuple[float, int, int, float, float]:
    """The server's resident MiB, threads and open files; the WAL's and the index folder's MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rss = int(status["VmRSS"].split()[0]) / 1024
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    sizes = {f.name: _size(f) for f in index.rglob("*")}
    wal = sum(size for name, size in sizes.items() if name.endswith("-wal")) / 2**20
    return rss, int(status["Threads"]), fds, wal, sum(sizes.values()) / 2**20


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:  # replaced by the server meanwhile (a snapshot)
        return 0


def wrong_keys(truth: dict[str, Written | None], stored: dict[str, Written], found: set[str]) -> int:
    """Keys of ``truth`` that ``stored`` (key -> vector, attributes) does not hold as the last
    acknowledged call left them (None: deleted), or that a search for their vector does not find
    (``found``: the keys found so, with a score of 1)."""
    wrong = 0
    for key, want in truth.items():
        got = stored.get(key)
        if want is None or got is None:
            wrong += (want is None) != (got is None)
        else:
            wrong += not np.allclose(got[0], want[0], atol=1e-4) or got[1] != want[1] or key not in found
    return wrong


def found_by_search(held: dict[str, np.ndarray], search: Callable[[np.ndarray], list[tuple[str, float]]]) -> set[str]:
    """Keys of ``held`` among the hits scoring 1 of a search for their vector (keys written from
    one image share a vector, so all of them, not only the first, are looked for)."""
    return {key for key, vector in held.items() if any(k == key and score > 1 - 1e-4 for k, score in search(vector))}


def served_writes(client: PictorClient, truth: dict[str, Written | None]) -> int:
    """Keys wrong as the server answers Get and Search by vector."""
    items, _ = client.get(list(truth), vectors=True)
    stored = {it.key: (np.asarray(it.vector, np.float32), it.attributes) for it in items}
    held = {key: want[0] for key, want in truth.items() if want is not None}
    found = found_by_search(held, lambda v: [(h.key, h.score) for h in client.search(vector=v, k=WRITE_KEYS + 1)])
    return wrong_keys(truth, stored, found)


def stored_writes(index: Path, truth: dict[str, Written | None]) -> int:
    """Keys wrong in the index opened anew after the server has stopped."""
    with IndexStore.open(index) as store:
        got = store.get(list(truth), vectors=True)
        assert got.vectors is not None
        stored = {it.key: (vector, dict(it.attributes)) for it, vector in zip(got.items, got.vectors, strict=True)}
        held = {key: want[0] for key, want in truth.items() if want is not None}
        found = found_by_search(held, lambda v: [(h.key, h.score) for h in store.search(v[None], WRITE_KEYS + 1)[0]])
    return wrong_keys(truth, stored, found)


def jpeg_bytes(png: Path) -> bytes:
    out = io.BytesIO()
    Image.open(png).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seconds", type=float, default=900.0, help="length of the soak")
    ap.add_argument("--sample-every", type=float, default=60.0, help="seconds between rows")
    ap.add_argument("--readers", type=int, default=2, help="threads sending the reading mix")
    ap.add_argument("--workers", type=int, default=8, help="the server's handler threads (serve --workers)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.sample_every <= 0 or args.seconds < args.sample_every:
        ap.error("--sample-every must be positive and at most --seconds")
    print(machine_line())
    queries = sorted((SAMPLE / "queries").rglob("*.png"))
    images = [q.read_bytes() for q in queries]
    with tempfile.TemporaryDirectory() as tmp, served(Path(tmp), ["--workers", str(args.workers)]) as (
            target, server, index):
        with PictorClient(target, timeout=60) as client:
            keys = [it.key for it in client.iter_items()]
            stored, _ = client.get(keys[:50], vectors=True)
            vectors = [it.vector or [] for it in stored]
            embeddings = [np.asarray(client.embed([image])[0], dtype=np.float32) for image in images]
            dim = len(embeddings[0])
            tally, stop = Tally(), threading.Event()
            health_ms: list[float] = []
            truth: dict[str, Written | None] = {}
            unsure: set[str] = set()
            threads = [threading.Thread(target=reader, args=(client, tally, images, keys, vectors, stop, args.seed + i))
                       for i in range(args.readers)]
            threads += [threading.Thread(target=writer, args=(client, tally, images, embeddings, truth, unsure, stop,
                                                         args.seed)),
                        threading.Thread(target=bad_caller, args=(client, tally, jpeg_bytes(queries[0]), dim, stop)),
                        threading.Thread(target=prober, args=(client, health_ms, stop))]
            print(f"\n{args.readers} readers, 1 writer ({WRITE_KEYS} keys), 1 sender of bad calls and a health prober "
                  f"against serve --workers {args.workers} over {len(keys)} indexed images, for {args.seconds:g} s\n")
            print("| s | calls answered | calls/s | unexpected errors | RSS MiB | threads | open files | WAL MiB "
                  "| index MiB | health p99 ms |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for t in threads:
                t.start()
            start = time.monotonic()
            answered_before, probes_before, rss = 0, 0, []
            for row in range(1, int(args.seconds / args.sample_every) + 1):
                time.sleep(max(0.0, start + row * args.sample_every - time.monotonic()))
                answered, probes = tally.answered(), health_ms[probes_before:]
                mib, n_threads, fds, wal, size = process_row(server.pid, index)
                rss.append(mib)
                p99 = np.percentile(probes, 99) if probes else float("nan")
                print(f"| {row * args.sample_every:.0f} | {answered:,} | {(answered - answered_before) / args.sample_every:.0f} "
                      f"| {tally.unexpected()} | {mib:.0f} | {n_threads} | {fds} | {wal:.1f} | {size:.1f} | {p99:.1f} |",
                      flush=True)
                answered_before, probes_before = answered, probes_before + len(probes)
            stop.set()
            for t in threads:
                t.join()
            for key in unsure:
                truth.pop(key, None)
            wrong_served = served_writes(client, truth)
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = server.wait(60)
        except subprocess.TimeoutExpired:
            exit_code = None
        stop_s = time.monotonic() - stopped
        tracebacks = (Path(tmp) / "server.log").read_text(errors="replace").count("Traceback")
        # (a server that did not stop still holds the index: its not stopping is the problem counted)
        wrong_stored = stored_writes(index, truth) if exit_code is not None else 0

    print("\n| call | answered | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---|")
    for kind in sorted(set(tally.took) | set(tally.errors)):
        took = tally.took.get(kind) or [float("nan")]
        errors = ", ".join(f"{name} {n}" for name, n in sorted(tally.errors[kind].items())) or "-"
        print(f"| {kind} | {len(tally.took.get(kind, [])):,} | {np.percentile(took, 50):.1f} | "
              f"{np.percentile(took, 99):.1f} | {errors} |")
    problems = tally.unexpected() + wrong_served + wrong_stored + tracebacks + (exit_code != 0)
    print(f"\nRSS: {rss[0]:.0f} MiB at the first row, {rss[-1]:.0f} at the last ({rss[-1] - rss[0]:+.0f}), "
          f"at most {max(rss):.0f}; health checks: {len(health_ms):,}, failed {sum(np.isinf(health_ms))}")
    print(f"acknowledged writes: {len(truth)} soak keys checked, {wrong_served} wrong through the server, "
          f"{wrong_stored} in the index reopened after the stop ({len(unsure)} left out: their last call "
          f"failed); tracebacks in the server's log: {tracebacks}; SIGTERM: exit {exit_code} in {stop_s:.1f} s")
    print("verdict:", "ok" if problems == 0 else f"{problems} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
