"""Embedding benchmark: model throughput in fp32 and bf16, and decode+preprocess rates.

Three tables:

1. images/s of each backbone's forward pass (embedder.forward_batch: channels-last,
   inference_mode, pooling, L2 norm) on pre-decoded random batches, fp32 and bf16 autocast;
   random init, which costs the same as trained weights; with ``--compile`` also through
   ``torch.compile`` (``pictor index/serve --compile``), after its first batch, whose
   seconds (the compilation) are printed;
2. decode + preprocess images/s (one thread, load_image + Embedder.preprocess) on the real
   JPEGs of --data (every image under its class folders);
3. the same on 12 MP JPEGs made from them (upscaled to 4000x3000, quality 90, in a temp
   dir), without and with JPEG draft mode.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/embed.py \\
        --data ../shared/datasets/flowers/train
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from pictor.core.decode import load_image
from pictor.core.embedder import Embedder, create_embedder

from common import machine_line, parser

DEFAULT_MODELS = "resnet18,resnet50,efficientnet_lite0,mobilenet_v3_large"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="image folder (searched recursively)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated backbone names")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--seconds", type=float, default=9.0,
                   help="timed seconds per measurement (best of 3 windows)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--decode-images", type=int, default=300,
                   help="images of --data timed for decode (0 = all)")
    p.add_argument("--big-images", type=int, default=12, help="12 MP JPEGs to make and time (0: no 12 MP table)")
    p.add_argument("--skip-models", action="store_true", help="decode tables only")
    p.add_argument("--compile", action="store_true", help="also time each model through torch.compile")
    return p.parse_args(argv)


def timed_rate(step: Callable[[], int], seconds: float, warmup: int = 1,
               windows: int = 3) -> float:
    """Items per second of ``step`` (which returns how many items it did), after warm-up.

    The best of ``windows`` timed windows (each >= 1 step): other processes on a shared
    machine only ever slow a window down, so the best one is the closest to the truth.
    """
    for _ in range(warmup):
        step()
    best = 0.0
    for _ in range(windows):
        done, steps, start = 0, 0, time.perf_counter()
        while steps < 1 or time.perf_counter() - start < seconds / windows:
            done += step()
            steps += 1
        best = max(best, done / (time.perf_counter() - start))
    return best


def model_rates(args: argparse.Namespace) -> list[tuple[str, int, dict[str, float]]]:
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rates: dict[str, float] = {}
        size = 0
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            emb = create_embedder(name, weights="random", device=args.device,
                                  precision=precision, batch_size=args.batch_size)
            size = emb.spec.preprocessing.input_size
            batch = torch.randn(args.batch_size, 3, size, size)
            rates[precision] = timed_rate(functools.partial(_forward, emb, batch), args.seconds)
            print(f"  {name} {precision}: {rates[precision]:.1f} img/s", flush=True)
            if args.compile:
                emb.compile_backbone()
                start = time.perf_counter()
                _forward(emb, batch)  # compiles
                first_s = time.perf_counter() - start
                compiled = f"{precision} compiled"
                rates[compiled] = timed_rate(functools.partial(_forward, emb, batch), args.seconds)
                print(f"  {name} {compiled}: {rates[compiled]:.1f} img/s (first batch {first_s:.0f} s)",
                      flush=True)
        rows.append((name, size, rates))
    return rows


def _forward(emb: Embedder, batch: torch.Tensor) -> int:
    return len(emb.forward_batch(batch).embeddings)


def decode_rates(paths: Sequence[Path], emb: Embedder, seconds: float,
                 rounds: int = 3) -> tuple[float, float]:
    """Single-thread load_image + preprocess rates over ``paths`` (cycled), without and with
    draft mode. The two alternate window by window so both see the same machine load."""
    def stepper(draft_size: tuple[int, int] | None) -> Callable[[], int]:
        i = 0

        def step() -> int:
            nonlocal i
            emb.preprocess(load_image(paths[i % len(paths)], draft_size=draft_size))
            i += 1
            return 1

        return step

    plain, draft = stepper(None), stepper(emb.draft_size)
    for _ in range(min(len(paths), 4)):  # warm the page cache and the allocators
        plain(), draft()
    best_plain = best_draft = 0.0
    for _ in range(rounds):
        best_plain = max(best_plain, timed_rate(plain, seconds / rounds, warmup=0, windows=1))
        best_draft = max(best_draft, timed_rate(draft, seconds / rounds, warmup=0, windows=1))
    return best_plain, best_draft


def make_big_jpegs(paths: Sequence[Path], out: Path, n: int) -> list[Path]:
    """12 MP (4000x3000) JPEGs upscaled from real photos: phone-camera decode cost."""
    made = []
    for k, src in enumerate(paths[:n]):
        with Image.open(src) as im:
            big = im.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
        dst = out / f"big{k:03d}.jpg"
        big.save(dst, "JPEG", quality=90)
        made.append(dst)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(machine_line(args.device), flush=True)
    if not args.skip_models:
        rows = model_rates(args)
        precisions = list(rows[0][2]) if rows else []
        print(f"\nForward pass, batch {args.batch_size}, pre-decoded (images/s)\n")
        head = "| model | input | " + " | ".join(precisions) + " | bf16 / fp32 |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for name, size, rates in rows:
            ratio = (f"{rates['bf16'] / rates['fp32']:.2f}x"
                     if "bf16" in rates and "fp32" in rates else "-")
            cells = " | ".join(f"{rates[p]:.1f}" for p in precisions)
            print(f"| {name} | {size} | {cells} | {ratio} |")

    emb = create_embedder("efficientnet_lite0", weights="random", device="cpu",
                          precision="fp32")
    torch.set_num_threads(1)  # decode runs one image per thread; time one thread
    paths = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    sample = paths[:: max(1, len(paths) // args.decode_images)] if args.decode_images else paths
    p = emb.spec.preprocessing
    print(f"\nDecode + preprocess, one thread (images/s); preprocessing: resize {p.resize_size} "
          f"{p.interpolation}, crop {p.input_size}\n")
    print("| images | without draft | with draft | speed-up |")
    print("|---|---|---|---|")
    plain, draft = decode_rates(sample, emb, args.seconds)
    print(f"| {len(sample)} of {args.data} | {plain:.1f} | {draft:.1f} | {draft / plain:.1f}x |",
          flush=True)
    if not args.big_images:
        return 0
    with tempfile.TemporaryDirectory(prefix="pictor-bench-") as tmp:
        big = make_big_jpegs(paths[:: max(1, len(paths) // args.big_images)], Path(tmp),
                             args.big_images)
        plain, draft = decode_rates(big, emb, args.seconds)
        print(f"| {len(big)} x 12 MP JPEG (4000x3000, q90) | {plain:.1f} | {draft:.1f} | "
              f"{draft / plain:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
