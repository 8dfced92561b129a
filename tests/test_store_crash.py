"""Crash safety: SIGKILL a writer process at random moments, then check the store.

The writer (this file run as a script) upserts, replaces and deletes keys in a store,
printing ``BEGIN <op>`` before each call and ``ACK`` once it returned. After each kill the
test opens the store and checks that every acknowledged operation is there, that the one
in flight was applied whole or not at all, that every stored vector is intact, and that
FAISS agrees with the database (each present key is found by its own vector, no other).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_until

from pictor.core.spec import ModelSpec
from pictor.core.store import IndexStore, Item, SearchParams, StoreOptions

DIM = 16
KEYS = [f"k{i}" for i in range(120)]
# Snapshots every few items, so kills also land inside snapshot writes and compactions.
OPTIONS = StoreOptions(snapshot_every=15, compact_ratio=0.2)
ITERATIONS = 10


def vector_for(key: str, label: str) -> np.ndarray:
    """The vector a writer stores for (key, label): deterministic, so the test can check it."""
    seed = int.from_bytes(hashlib.sha256(f"{key}/{label}".encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def writer(path: str, seed: int) -> None:
    """Run operations until killed; one BEGIN/ACK pair of stdout lines per operation."""
    rng = random.Random(seed)
    store = IndexStore.open(path, rebuild_in_background=seed % 2 == 1)  # as a server: kills land in those too
    print("READY", flush=True)
    for n in range(10**9):
        if rng.random() < 0.7:
            batch = {key: f"s{seed}n{n}" for key in rng.sample(KEYS, rng.randint(1, 6))}
            print("BEGIN U " + ",".join(f"{k}={v}" for k, v in batch.items()), flush=True)
            vectors = np.stack([vector_for(k, v) for k, v in batch.items()])
            store.upsert([Item(k, label=v) for k, v in batch.items()], vectors)
        else:
            keys = rng.sample(KEYS, rng.randint(1, 4))
            print("BEGIN D " + ",".join(keys), flush=True)
            store.delete(keys)
        print("ACK", flush=True)
        if rng.random() < 0.05:
            store.snapshot()


def apply(state: dict[str, str], line: str) -> dict[str, str]:
    """The state after the operation named by a ``BEGIN`` line."""
    new = dict(state)
    kind, args = line.split(" ", 2)[1:]
    for arg in args.split(","):
        if kind == "U":
            key, label = arg.split("=")
            new[key] = label
        else:
            new.pop(arg, None)
    return new


def run_and_kill(path: Path, seed: int, rng: random.Random) -> list[str]:
    """Start a writer, let it work for a random moment, SIGKILL it; its stdout lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("READY"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not ready.wait(timeout=60):
        proc.kill()
        raise AssertionError(f"writer never became ready: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    reader.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return lines


def observed_state(store: IndexStore) -> dict[str, str]:
    """Key -> label as the store answers, checking each vector and FAISS along the way."""
    state: dict[str, str] = {}
    for key in KEYS:
        try:
            vec = store.get_vector(key)
        except KeyError:
            continue
        hits = store.search(vec, k=5, params=SearchParams(ef_search=256))[0]
        assert hits and hits[0].key == key, f"FAISS does not find {key} by its own vector"
        state[key] = hits[0].label
        np.testing.assert_allclose(vec, vector_for(key, hits[0].label), atol=1e-6)
    assert len(store) == len(state)
    return state


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_sigkill_never_loses_acknowledged_writes(tmp_path: Path, index_type: str) -> None:
    path = tmp_path / "store"
    IndexStore.create(
        path, ModelSpec("test_backbone", "random", DIM), index_type=index_type, options=OPTIONS
    ).close()
    rng = random.Random(1234)
    state: dict[str, str] = {}
    acked_ops = 0
    for iteration in range(ITERATIONS):
        lines = run_and_kill(path, seed=iteration, rng=rng)
        pending = None
        for line in lines:
            if line.startswith("BEGIN"):
                pending = line
            elif line == "ACK":
                assert pending is not None
                state, pending = apply(state, pending), None
                acked_ops += 1
        with IndexStore.open(path) as store:
            seen = observed_state(store)
            assert store.info().count == len(seen)
        allowed = [state] + ([apply(state, pending)] if pending else [])
        assert seen in allowed, (
            f"iteration {iteration}: store holds {seen}, expected {state} "
            f"or that plus the in-flight {pending!r}"
        )
        state = seen
    assert acked_ops > ITERATIONS  # the writers really wrote between kills


def test_a_background_job_due_at_open_starts_after_a_snapshot_and_an_empty_wal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server killed during a background rebuild left its last writes in the WAL, beyond the
    FAISS snapshot. Each open started the rebuild again, whose read transaction kept the WAL
    from restarting and put the next snapshot off until it ended: killed again and again, the
    replay at each open and the WAL grew with every kill (5 kills: 68 MB -> 1.3 GB of WAL)."""
    path = tmp_path / "store"
    IndexStore.create(path, ModelSpec("test_backbone", "random", DIM), index_type="IVF16,Flat",
                      options=StoreOptions(snapshot_every=50)).close()
    killed = f"""
import os, sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_store_crash import vector_for
from pictor.core.store import IndexStore, Item
keys = [f"b{{i}}" for i in range(700)]
store = IndexStore.open({str(path)!r})
with store.bulk():  # its training (IVF16 over the exact stand-in) waits for the end of the bulk load
    store.upsert([Item(k) for k in keys], np.stack([vector_for(k, "") for k in keys]))
    os._exit(0)  # as a kill: the training never ran, no snapshot was saved, the WAL holds the load
"""
    subprocess.run([sys.executable, "-c", killed], check=True, timeout=120)
    wal = path / "metadata.sqlite-wal"
    assert wal.stat().st_size > 0
    at_start: list[tuple[int, int]] = []
    real = IndexStore._background_maintenance

    def observed(self: IndexStore, *args: Any) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        at_start.append((wal.stat().st_size, manifest["snapshot"]["seq"]))
        real(self, *args)

    monkeypatch.setattr(IndexStore, "_background_maintenance", observed)
    with IndexStore.open(path, rebuild_in_background=True) as store:  # as a server opens it
        wait_until(lambda: not store.info().rebuilding)
        assert store.info().index_type == "IVF16,Flat" and len(store) == 700
        assert at_start == [(0, store.seq)]  # the replay saved, the WAL emptied, then the job


if __name__ == "__main__":
    writer(sys.argv[1], int(sys.argv[2]))
