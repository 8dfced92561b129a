"""Dynamic batching: Classify calls per second from 1, 8 and 32 clients at once against a real
`pictor serve`, beside what the model alone runs at batch 1 and at the server's batch size.

The server runs the images of all calls waiting for the model in one forward pass (up to
`--batch-size`, passed to `pictor serve`; its default, 8): calls that come while a pass runs
share the next, and with `--max-queue-delay-ms` a pass that is not full waits that long for
more. Each client is a thread of this process sending Classify of the same photo as soon as
the last is answered (one PictorClient each, as separate users); the server gets
`--workers` handler threads enough for them all (a call beyond the waiting calls it allows is
refused as busy). The table gives calls per second, that as a share of the model's rate at the
batch size (images already decoded and preprocessed: the server also decodes each image, on
the same cores), latency, errors, and the mean images per forward pass read from the server's
metrics (`pictor_model_batch_images`; "-" for a server without it). Without an `--index` the
bundled sample gallery is indexed first.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/batching.py
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from pictor.client import PictorClient
from pictor.errors import PictorError

from common import SAMPLE, free_port, machine_line, parser, served


def model_rate(image: Path, batch: int, seconds: float) -> float:
    """Images per second through the default backbone alone at ``batch`` (best of 3 windows)."""
    import torch

    from pictor.core.decode import load_image
    from pictor.core.embedder import create_embedder

    embedder = create_embedder()
    x = torch.stack([embedder.preprocess(load_image(image))] * batch)
    embedder.forward_batch(x)  # warm-up
    best = 0.0
    for _ in range(3):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 3:
            embedder.forward_batch(x)
            n += batch
        best = max(best, n / (time.perf_counter() - start))
    return best


def passes(metrics_port: int) -> tuple[float, float] | None:
    """(images, passes) so far from the server's metrics; None when it has no such metric."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = dict(re.findall(r"^pictor_model_batch_images_(sum|count) (\S+)$", text, re.M))
    return (float(found["sum"]), float(found["count"])) if len(found) == 2 else None


def clients_run(target: str, image: bytes, clients: int, seconds: float) -> tuple[int, int, list[float]]:
    """(answered, failed, milliseconds of each answered call) for ``clients`` threads classifying
    ``image`` in a loop for ``seconds``."""
    answered, failed, ms = [0], [0], []
    lock, start = threading.Lock(), threading.Barrier(clients)

    def loop() -> None:
        with PictorClient(target, timeout=120) as client:
            client.health()  # connected before the window opens
            start.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    client.classify(image)
                except PictorError:
                    with lock:
                        failed[0] += 1
                    continue
                if time.monotonic() < end:  # (a call answered after the window is not its)
                    with lock:
                        answered[0] += 1
                        ms.append(1000 * (time.perf_counter() - t))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answered[0], failed[0], ms


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated numbers of clients at once")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed window of each row")
    ap.add_argument("--batch-size", type=int, default=8, help="the server's --batch-size")
    ap.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="the server's --max-queue-delay-ms")
    ap.add_argument("--model-seconds", type=float, default=9.0, help="timing of the model alone, each batch size")
    ap.add_argument("--image", type=Path, default=SAMPLE / "photos" / "daisy.jpg", help="the photo classified")
    ap.add_argument("--index", type=Path, help="index to serve (default: the sample gallery, indexed first)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(machine_line())
    alone_1, alone_full = (model_rate(args.image, batch, args.model_seconds) for batch in (1, args.batch_size))
    print(f"model alone (efficientnet_lite0, images decoded and preprocessed): batch 1 {alone_1:.1f} images/s, "
          f"batch {args.batch_size} {alone_full:.1f} images/s")
    image = args.image.read_bytes()
    metrics_port = free_port()
    serve_args = ["--workers", str(max(counts) + 8), "--metrics-port", str(metrics_port)]
    if args.batch_size != 8:  # (a server before --batch-size takes none)
        serve_args += ["--batch-size", str(args.batch_size)]
    if args.max_queue_delay_ms:
        serve_args += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    print(f"| clients | calls/s | of the model's batch-{args.batch_size} rate | p50 ms | p99 ms | errors | "
          "images per pass |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, served(Path(tmp), serve_args, index=args.index) as (target, _, _):
        clients_run(target, image, max(counts), 3.0)  # warm-up
        for n in counts:
            before = passes(metrics_port)
            answered, failed, ms = clients_run(target, image, n, args.seconds)
            after = passes(metrics_port)
            per_pass = "-"
            if before is not None and after is not None and after[1] > before[1]:
                per_pass = f"{(after[0] - before[0]) / (after[1] - before[1]):.1f}"
            rate = answered / args.seconds
            p50, p99 = (np.percentile(ms, [50, 99]) if ms else (float("nan"),) * 2)
            print(f"| {n} | {rate:.1f} | {rate / alone_full:.2f} | {p50:.0f} | {p99:.0f} | {failed} | {per_pass} |",
                  flush=True)


if __name__ == "__main__":
    main()
