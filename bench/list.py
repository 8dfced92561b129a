"""List benchmark: the time to page through a whole index with `IndexStore.list_items`
(the List RPC, `pictor list`), unfiltered and through filters of every selectivity.

An export pages through the index in key order, 1,000 items a page by default. A store of
``--size`` items (random keys; labels class0-class9 on all but one item in 1,000, which is
labelled "rare"; attribute shard 0/1 alternating) is made in a temporary folder, with tiny
vectors (dim 8): listing reads the items table, not the vectors. Each row of the table is one
full listing, every page of it.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/list.py --size 1000000
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np

from pictor.core.spec import ModelSpec
from pictor.core.store import Filter, IndexStore, Item

from common import machine_line, parser

FILTERS = (
    ("none", None),
    ("label: 5 of 10 classes", Filter(labels=[f"class{i}" for i in range(5)])),
    ("attribute shard=1", Filter(attributes={"shard": "1"})),
    ("label class1 and shard=1", Filter(labels=["class1"], attributes={"shard": "1"})),
    ("label rare (1 in 1,000)", Filter(labels=["rare"])),
)


def fill(store: IndexStore, size: int, batch: int = 50_000) -> None:
    rnd = random.Random(0)
    rng = np.random.default_rng(0)
    for start in range(0, size, batch):
        ids = range(start, min(size, start + batch))
        items = [Item(f"img/{rnd.random():.12f}.jpg", "rare" if i % 1000 == 0 else f"class{i % 10}",
                      {"shard": str(i % 2)}) for i in ids]
        vecs = rng.standard_normal((len(items), store.dim)).astype(np.float32)
        store.upsert(items, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))


def list_all(store: IndexStore, flt: Filter | None, limit: int) -> tuple[int, int, float]:
    """Pages, items and seconds of one full listing."""
    start, pages, count, after = time.perf_counter(), 0, 0, ""
    while True:
        page = store.list_items(after, limit, filter=flt)
        pages, count = pages + 1, count + len(page.items)
        if not (after := page.next):
            return pages, count, time.perf_counter() - start


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--size", type=int, default=100_000, help="items in the store")
    ap.add_argument("--limit", type=int, default=1000, help="items a page")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the store (made if missing; default: the system's temp)")
    args = ap.parse_args()
    print(machine_line())
    if args.tmp:
        args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        spec = ModelSpec(backbone="bench", weights="random", dim=8)
        with IndexStore.create(Path(tmp) / "store", spec, index_type="Flat") as store:
            fill(store, args.size)
            print(f"\n{args.size:,} items, pages of {args.limit}\n")
            print("| filter | pages | items | seconds | ms a page |")
            print("|---|---|---|---|---|")
            for name, flt in FILTERS:
                pages, count, seconds = list_all(store, flt, args.limit)
                print(f"| {name} | {pages:,} | {count:,} | {seconds:.2f} | {1000 * seconds / pages:.1f} |")


if __name__ == "__main__":
    main()
