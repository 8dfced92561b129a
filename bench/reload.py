"""Model reload under load: Classify calls per second, latency and errors from clients classifying
without a pause, first with no reload, then while the served --model file is swapped and the
server sent SIGHUP every `--reload-every` seconds; and how long a reload takes to serve.

Two linear heads are trained on the bundled sample gallery (the emoji of 9 categories; the
second with another seed), the gallery is indexed and served with the first. In the reload row
the file is replaced by the other head (os.replace, as a deployment would) before each SIGHUP;
a reload's time runs from the signal until Info reports the new file's SHA-256. Each client is
a thread of this process (one PictorClient each) classifying the same photo in a loop, as in
bench/batching.py; an error is any call that failed.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/reload.py
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pictor.client import PictorClient

from batching import clients_run
from common import SAMPLE, machine_line, parser, pictor, served


def train(out: Path, seed: int, cache: Path) -> None:
    pictor("train", SAMPLE / "gallery", "--out", out, "--seed", seed, "--cache-dir", cache)


def reloading(proc: subprocess.Popen[bytes], target: str, served_file: Path, files: list[Path], every: float,
              stop: threading.Event, took: list[float]) -> None:
    """Swap ``served_file`` for the next of ``files`` and SIGHUP the server every ``every`` seconds
    until ``stop``; into ``took``, the seconds each reload took to show in Info."""
    staged = served_file.with_suffix(".tmp")
    with PictorClient(target, timeout=60) as client:
        for n in itertools.count(1):
            if stop.wait(every):
                break
            new = files[n % len(files)]
            sha = hashlib.sha256(new.read_bytes()).hexdigest()
            shutil.copy(new, staged)
            os.replace(staged, served_file)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGHUP)
            while client.info().model_sha256 != sha:
                time.sleep(0.002)
            took.append(time.perf_counter() - sent)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--clients", type=int, default=8, help="clients classifying at once")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed window of each row")
    ap.add_argument("--reload-every", type=float, default=1.0, help="seconds between reloads in the reload row")
    ap.add_argument("--image", type=Path, default=SAMPLE / "photos" / "daisy.jpg", help="the photo classified")
    args = ap.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        heads = [folder / "a.pt", folder / "b.pt"]
        for seed, head in enumerate(heads):
            train(head, seed, folder / "cache")
        served_file = folder / "served.pt"
        shutil.copy(heads[0], served_file)
        image = args.image.read_bytes()
        serve_args = ["--model", str(served_file), "--workers", str(args.clients + 8)]
        print("| reloads | calls/s | p50 ms | p99 ms | errors | reload ms (median, max) |")
        print("|---|---:|---:|---:|---:|---:|")
        with served(folder, serve_args) as (target, proc, _):
            clients_run(target, image, args.clients, 3.0)  # warm-up
            for every in (0.0, args.reload_every):
                stop, took = threading.Event(), list[float]()
                reloader = threading.Thread(target=reloading,
                                            args=(proc, target, served_file, heads, every, stop, took))
                if every:
                    reloader.start()
                answered, failed, ms = clients_run(target, image, args.clients, args.seconds)
                if every:
                    stop.set()
                    reloader.join()
                p50, p99 = np.percentile(ms, [50, 99]) if ms else (float("nan"),) * 2
                row = f"{len(took)}, one every {every:g} s" if every else "none"
                reload_ms = f"{1000 * np.median(took):.0f}, {1000 * max(took):.0f}" if took else "-"
                print(f"| {row} | {answered / args.seconds:.1f} | {p50:.0f} | {p99:.0f} | {failed} | {reload_ms} |",
                      flush=True)


if __name__ == "__main__":
    main()
