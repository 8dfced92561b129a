"""Writes while the index is rebuilt: what a client of a growing served index sees.

An `IndexStore` is filled (bulk-loaded) with ``--items`` minus one batch of the synthetic
embeddings of bench/search.py (a Gaussian mixture in a 64-d latent space projected to
``--dim`` and normalised; see its docstring); one more batch then brings it to the size where
``--index-type`` is rebuilt (``auto``: at 100,000 items the exact stand-in gives way to
``PCA128,IVF<4 sqrt(n)>_HNSW32,SQ8,Refine(SQfp16)``). Timed: the write that crosses (it
returns at once when the rebuild runs in the background, as a server runs the store; it
takes the whole rebuild when not), then, until the new index is in place, an upsert of a
batch and a search by vector every ``--interval`` seconds, and at the end whether each item
written during the rebuild is found first by its own vector in the new index.

Run::

    .venv/bin/python bench/rebuild.py                    # both modes at 100,000 items
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from search import Mixture

from pictor.core.spec import ModelSpec
from pictor.core.store import IndexStore, Item

from common import machine_line, parser


def run(args: argparse.Namespace, background: bool, vectors: np.ndarray, root: Path) -> str:
    fill = args.items - args.batch
    store = IndexStore.create(root, ModelSpec("synthetic", "random", args.dim), index_type=args.index_type)
    try:
        with store.bulk():
            for start in range(0, fill, 10_000):
                end = min(start + 10_000, fill)
                store.upsert([Item(f"k{i}") for i in range(start, end)], vectors[start:end])
        store.rebuild_in_background = background
        before = store.info().factory
        started = time.perf_counter()
        store.upsert([Item(f"k{i}") for i in range(fill, args.items)], vectors[fill:args.items])
        crossing = time.perf_counter() - started
        writes, searches, at = [], [], args.items
        while store.info().rebuilding:
            if at + args.batch > len(vectors):
                raise SystemExit(f"the rebuild outlasted {len(vectors) - args.items} extra items: raise --extra")
            t = time.perf_counter()
            store.upsert([Item(f"k{i}") for i in range(at, at + args.batch)], vectors[at:at + args.batch])
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.search(vectors[at - args.items // 2], k=10)
            searches.append(time.perf_counter() - t)
            at += args.batch
            time.sleep(args.interval)
        rebuild = time.perf_counter() - started
        info = store.info()
        assert info.count == at, (info.count, at)
        hits = store.search(vectors[args.items:at], k=1) if at > args.items else []
        found = sum(h.keys[0] == f"k{args.items + j}" for j, h in enumerate(hits))
    finally:
        store.close()

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:,.0f} / {max(xs) * 1000:,.0f}" if xs else "-"

    return (f"| {'background' if background else 'in the write'} | {args.items:,} | {before} -> {info.factory} | "
            f"{rebuild:.1f} | {crossing:.2f} | {len(writes)} | {ms(writes)} | {ms(searches)} | "
            f"{found} of {len(hits)} |")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--items", type=int, default=100_000, help="the size the crossing write brings it to")
    p.add_argument("--index-type", default="auto", help="'auto' or a FAISS factory string")
    p.add_argument("--modes", default="background,write", help="background (as a server), write (the "
                   "write that calls for it rebuilds, as `pictor index`), or both")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--batch", type=int, default=100, help="items per upsert")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between writes during the rebuild")
    p.add_argument("--extra", type=int, default=80_000, help="synthetic items drawn for writes during it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the stores (default: the system's temporary one)")
    args = p.parse_args()
    if unknown := set(args.modes.split(",")) - {"background", "write"}:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; give background, write or both")
    print(machine_line())
    vectors = np.concatenate(list(Mixture(args.dim, seed=args.seed).sample(args.items + args.extra, args.seed + 1)))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for mode in args.modes.split(","):
            rows.append(run(args, mode == "background", vectors, Path(tmp) / mode))
    print(f"\nwrites of {args.batch} items every {args.interval} s while the index is rebuilt; times in "
          "seconds, writes and searches during it in ms (median / max)\n")
    print("| rebuilt | items | index | rebuild s | crossing write s | writes during | write ms | search ms | "
          "written during, found first |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
