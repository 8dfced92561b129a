"""Search benchmark: every index type on synthetic embeddings, plus the store's overhead.

Data (``--data`` swaps in real embeddings from a ``.npy`` file instead). Synthetic vectors
shaped like CNN image embeddings:

    latent z = mu_c + s_c * g        c ~ Categorical(w), w ~ Dirichlet(1) over 1000 clusters,
                                     mu_c ~ N(0, I_64), s_c ~ U(0.3, 0.7), g ~ N(0, I_64)
    signal   = normalise((z * lam) @ W + m)
                                     lam_j = j^-0.5 (decaying spectrum), W ~ N(0, 1/64) of
                                     shape 64 x dim, m = 0.6 * |N(0, I_dim)| / sqrt(dim)
                                     (a shared positive mean, as post-ReLU features have)
    x        = normalise(signal + 0.5 * e / sqrt(dim))    e ~ N(0, I_dim): noise carrying
                                     20% of the energy

Queries are fresh draws from the same mixture (never in the index). Ground truth is exact
inner-product search. For each size and index type the bench reports build time (train +
add), resident memory the index added, recall@10 against exact search, queries/s with one
query per call ("single", a loop on one thread) and with all queries in one call
("batched"); search parameters are tuned per type to the lowest setting reaching
``--target`` recall@10 on separate tuning queries (with 95% confidence: the lower bound of
the tuning sample's recall must reach it). ``auto`` is built through
``IndexStore`` (SQLite + FAISS, bulk-loaded, trained once) and its single-query search is
compared with calling FAISS directly with the same parameters (the store's overhead: each
query timed both ways back to back, the median over rounds; also from separate loops).

Run (on a shared machine)::

    .venv/bin/python bench/search.py --sizes 100000,1000000 --lock /tmp/pictor-cpu.lock

``--lock`` takes that file's exclusive ``flock`` around every timed query window (tuning,
recall, queries/s), so work that others wrap in the same lock stays off the CPU while
queries are timed; builds run unlocked and their times are upper bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from pictor.core.faiss_index import SearchKnobs, VectorIndex, recall_at_k, tune_knobs
from pictor.core.spec import ModelSpec
from pictor.core.store import IndexStore, Item, StoreOptions

from common import machine_line, parser

K = 10
OVERHEAD_ROUNDS = 7  # interleaved store / raw FAISS timing rounds
CHUNK = 50_000


@dataclass
class Row:
    size: int
    index: str
    build_s: float
    memory_mb: float
    recall: float
    single_qps: float
    batched_qps: float
    params: str
    note: str = ""


# -- data -----------------------------------------------------------------------------------


class Mixture:
    """The synthetic embedding distribution described in the module docstring."""

    def __init__(self, dim: int, seed: int = 0, latent: int = 64, clusters: int = 1000) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.weights = rng.dirichlet(np.ones(clusters))
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.spread = rng.uniform(0.3, 0.7, clusters).astype(np.float32)
        self.lam = (np.arange(1, latent + 1, dtype=np.float32) ** -0.5).astype(np.float32)
        self.proj = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.mean = (0.6 * np.abs(rng.standard_normal(dim)) / np.sqrt(dim)).astype(np.float32)

    def sample(self, n: int, seed: int) -> Iterator[np.ndarray]:
        """``n`` vectors in blocks of ``CHUNK`` (deterministic for a seed)."""
        rng = np.random.default_rng(seed)
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            c = rng.choice(len(self.weights), size=m, p=self.weights)
            z = self.centres[c] + self.spread[c, None] * rng.standard_normal(
                (m, self.centres.shape[1]), dtype=np.float32
            )
            signal = _normalise((z * self.lam) @ self.proj + self.mean)
            noise = rng.standard_normal((m, self.dim), dtype=np.float32)
            yield _normalise(signal + (0.5 / np.sqrt(self.dim)) * noise)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def load_data(args: argparse.Namespace, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base [size, dim], tuning queries, test queries), all L2-normalised float32."""
    if args.data:
        real = _normalise(np.load(args.data, mmap_mode="r").astype(np.float32))
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(real))
        nq = args.tune_queries + args.queries
        q = real[order[:nq]]
        base = real[order[nq : nq + size]]
        return base, q[: args.tune_queries], q[args.tune_queries :]
    mix = Mixture(args.dim, seed=args.seed)
    # Written once to a .npy and memory-mapped: the base stays out of anonymous memory, so
    # index memory is measurable and a 1M x 1280 run fits beside other work.
    cache = Path(args.cache) / f"synthetic-{args.dim}-{args.seed}-{size}.npy"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(size, args.dim))
        at = 0
        for block in mix.sample(size, seed=args.seed + 1):
            out[at : at + len(block)] = block
            at += len(block)
        out.flush()
        del out
        tmp.rename(cache)
    base = np.load(cache, mmap_mode="r")
    q = np.concatenate(list(mix.sample(args.tune_queries + args.queries, seed=args.seed + 2)))
    return base, q[: args.tune_queries], q[args.tune_queries :]


def exact_topk(base: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids of each query (a flat inner-product scan) and its time."""
    started = time.perf_counter()
    _, ids = faiss.knn(q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids, time.perf_counter() - started


# -- measuring ------------------------------------------------------------------------------


def rss_mb() -> float:
    """Anonymous resident memory (what indexes allocate; the mmapped base is not counted)."""
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def single_qps(search, q: np.ndarray, budget_s: float) -> float:  # noqa: ANN001
    """Queries/s issuing one query per call, for up to ``len(q)`` queries or ``budget_s``."""
    started = time.perf_counter()
    done = 0
    for i in range(len(q)):
        search(q[i : i + 1])
        done += 1
        if time.perf_counter() - started > budget_s:
            break
    return done / (time.perf_counter() - started)


@contextlib.contextmanager
def quiet_cpu(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (if given) while queries are timed."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_raw(factory: str, base: np.ndarray, train_n: int) -> VectorIndex:
    """A VectorIndex of ``factory`` trained on a sample and filled in blocks."""
    from pictor.core.faiss_index import training_size

    need = training_size(base.shape[1], factory)
    sample = None
    if need:
        rng = np.random.default_rng(0)
        take = min(len(base), max(need, train_n))
        sample = base[np.sort(rng.choice(len(base), take, replace=False))]
    index = VectorIndex.build(base.shape[1], factory, sample)
    for start in range(0, len(base), CHUNK):
        ids = np.arange(start, min(start + CHUNK, len(base)), dtype=np.int64)
        index.add(ids, base[start : start + len(ids)])
    return index


def bench_raw(
    factory: str, base: np.ndarray, tq: np.ndarray, tgt: np.ndarray, q: np.ndarray,
    gt: np.ndarray, args: argparse.Namespace,
) -> Row:
    before = rss_mb()
    started = time.perf_counter()
    index = build_raw(factory, base, args.train)
    build_s = time.perf_counter() - started
    memory = rss_mb() - before
    with quiet_cpu(args.lock):
        knobs, _ = tune_knobs(index, tq, tgt, args.target, K)
        _, found = index.search(q, K, knobs)
        recall = recall_at_k(found, gt, K)
        started = time.perf_counter()
        index.search(q, K, knobs)
        batched = len(q) / (time.perf_counter() - started)
        single = single_qps(lambda x: index.search(x, K, knobs), q, args.single_budget)
    return Row(len(base), factory, build_s, memory, recall, single, batched, _knobs(knobs))


def bench_store(
    base: np.ndarray, tq: np.ndarray, tgt: np.ndarray, q: np.ndarray, gt: np.ndarray,
    args: argparse.Namespace,
) -> list[Row]:
    """`auto` through IndexStore: bulk upsert, one training, then store vs raw FAISS."""
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pictor-bench-", dir=args.tmp))
    spec = ModelSpec(backbone="synthetic", weights="none", dim=base.shape[1])
    options = StoreOptions(memory_budget_gb=args.memory_budget_gb, target_recall=args.target)
    before = rss_mb()
    started = time.perf_counter()
    store = IndexStore.create(root / "store", spec, options=options)
    with store.bulk():
        for start in range(0, len(base), 10_000):
            block = base[start : start + 10_000]
            store.upsert([Item(f"img/{start + j}.jpg", label=str((start + j) % 100))
                          for j in range(len(block))], block)
    build_s = time.perf_counter() - started
    memory = rss_mb() - before
    info = store.info()
    with quiet_cpu(args.lock):
        knobs = SearchKnobs(info.nprobe, info.ef_search, info.k_factor)
        key_to_row = lambda hits: [int(h.key[4:-4]) for h in hits]  # noqa: E731
        found = np.array([key_to_row(h) + [-1] * (K - len(h)) for h in store.search(q, K)])
        recall = recall_at_k(found, gt, K)
        started = time.perf_counter()
        store.search(q, K)
        batched = len(q) / (time.perf_counter() - started)
        # Store vs FAISS with the same parameters. The overhead comes from paired timings
        # (each query both ways, back to back): a VM's drift moves a loop of either by 10-40
        # points between rounds, but moves the two calls of a pair alike.
        faiss_index = store._index.index  # the very index the store searches
        params, _alive = store._index._params(knobs, None)
        raw_search = lambda x: faiss_index.search(x, K, params=params)  # noqa: E731
        store_search = lambda x: store.search(x, K)  # noqa: E731
        default_threads = faiss.omp_get_max_threads()
        raw, raw1, wrapped, paired = [], [], [], []
        for _ in range(OVERHEAD_ROUNDS):
            faiss.omp_set_num_threads(default_threads)  # the store leaves 1 set on this thread
            raw.append(single_qps(raw_search, q, args.single_budget / 3))
            faiss.omp_set_num_threads(1)  # as the store runs single queries
            raw1.append(single_qps(raw_search, q, args.single_budget / 3))
            wrapped.append(single_qps(store_search, q, args.single_budget / 3))
            paired.append(paired_overhead(store_search, raw_search, q))
        looped = sorted(r / w - 1 for r, w in zip(raw1, wrapped, strict=True))
        paired.sort()
        raw_qps, raw1_qps, store_qps = (float(np.median(x)) for x in (raw, raw1, wrapped))
        threaded = threaded_qps(store_search, q, args.client_threads, args.single_budget / 2)
    store.close()
    shutil.rmtree(root, ignore_errors=True)
    note = (
        f"{info.factory}; store overhead over raw FAISS with 1 OpenMP thread as the store "
        f"runs it, median of {OVERHEAD_ROUNDS} rounds: paired {np.median(paired):+.1%} (range "
        f"{paired[0]:+.1%} to {paired[-1]:+.1%}), separate loops {np.median(looped):+.1%} "
        f"(range {looped[0]:+.1%} to {looped[-1]:+.1%}); raw FAISS {raw1_qps:,.0f} q/s, "
        f"{raw_qps:,.0f} q/s with {default_threads} ({raw_qps / store_qps - 1:+.1%}); "
        f"{args.client_threads} client threads through the store: {threaded:,.0f} q/s"
    )
    return [
        Row(len(base), "auto (store)", build_s, memory, recall, store_qps, batched,
            _knobs(knobs), note)
    ]


def paired_overhead(wrapped, raw, q: np.ndarray) -> float:  # noqa: ANN001
    """How much longer ``wrapped`` takes than ``raw`` (0.1 = 10%), each query run through both
    back to back.

    The order alternates, so the second call's warm caches (the same query's lists) favour
    neither.
    """
    clock = time.perf_counter_ns
    spent = {wrapped: 0, raw: 0}
    for i in range(len(q)):
        x = q[i : i + 1]
        first, second = (raw, wrapped) if i % 2 else (wrapped, raw)
        t0 = clock()
        first(x)
        t1 = clock()
        second(x)
        t2 = clock()
        spent[first] += t1 - t0
        spent[second] += t2 - t1
    return spent[wrapped] / spent[raw] - 1


def threaded_qps(search, q: np.ndarray, threads: int, budget_s: float) -> float:  # noqa: ANN001
    """Queries/s of ``threads`` clients each issuing one query per call (as a server would)."""
    counts = [0] * threads
    deadline = time.perf_counter() + budget_s

    def client(t: int) -> None:
        i = t
        while time.perf_counter() < deadline:
            search(q[i % len(q) : i % len(q) + 1])
            counts[t] += 1
            i += threads

    started = time.perf_counter()
    pool = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return sum(counts) / (time.perf_counter() - started)


def _knobs(k: SearchKnobs) -> str:
    parts = [f"nprobe={k.nprobe}" if k.nprobe else "", f"efSearch={k.ef_search}" if k.ef_search else "",
             f"k_factor={k.k_factor:g}" if k.k_factor else ""]
    return " ".join(p for p in parts if p) or "-"


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    p.add_argument("--types",
                   default="Flat;HNSW32;IVF{nlist}_HNSW32,Flat;IVF{nlist}_HNSW32,PQ320x4fs;auto",
                   help="';'-separated FAISS factory strings or 'auto'; {nlist} becomes "
                        "about sqrt(size), a power of two (k-means at 1280-d stays ~1 min)")
    p.add_argument("--dim", type=int, default=1280, help="of the synthetic vectors")
    p.add_argument("--queries", type=int, default=1000, help="timed and scored queries")
    p.add_argument("--tune-queries", type=int, default=500,
                   help="separate queries that tune nprobe / efSearch")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the tuning must reach")
    p.add_argument("--train", type=int, default=40_000,
                   help="training sample size (at least 39 per IVF list)")
    p.add_argument("--single-budget", type=float, default=6.0, help="seconds per single loop")
    p.add_argument("--skip-hnsw-above", type=int, default=200_000,
                   help="sizes above this leave out HNSW types (not IVF over HNSW): their build takes hours")
    p.add_argument("--client-threads", type=int, default=2,
                   help="concurrent single-query clients for the store's throughput figure")
    p.add_argument("--memory-budget-gb", type=float, default=4.0, help="what `auto` may use")
    p.add_argument("--data", default="", help=".npy of real embeddings instead of synthetic")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic data")
    p.add_argument("--tmp", default=None, help="folder the store of `auto` is written under (made if missing; default: the system's temp)")
    p.add_argument("--cache", default="/tmp/pictor-bench-cache",
                   help="where generated vectors are kept between runs")
    p.add_argument("--out", default="", help="also write the rows as JSON here (folders made if missing)")
    p.add_argument("--lock", default="",
                   help="flock this file while queries are timed (see the module docstring)")
    args = p.parse_args()
    print(machine_line("cpu"), flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows: list[Row] = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.extend(bench_size(size, args))
    print_table(rows, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as --tmp is: a missing folder lost the rows after minutes of measuring
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))


def bench_size(size: int, args: argparse.Namespace) -> list[Row]:
    started = time.perf_counter()
    base, tq, q = load_data(args, size)
    logging.info("size %d: data ready in %.0fs", size, time.perf_counter() - started)
    gt, exact_s = exact_topk(base, q, K)
    tgt, _ = exact_topk(base, tq, K)
    logging.info("size %d: ground truth in %.0fs", size, exact_s)
    nlist = 2 ** round(np.log2(np.sqrt(size)))
    rows = []
    for name in args.types.split(";"):
        factory = name.format(nlist=nlist)
        t0 = time.perf_counter()
        if factory == "auto":
            rows.extend(bench_store(base, tq, tgt, q, gt, args))
        elif factory.startswith("HNSW") and size > args.skip_hnsw_above:
            rows.append(Row(size, factory, 0, 0, 0, 0, 0, "-",
                            f"skipped above {args.skip_hnsw_above:,} items (build time)"))
        elif factory == "Flat":
            rows.append(_bench_flat(base, q, exact_s, args))
        else:
            rows.append(bench_raw(factory, base, tq, tgt, q, gt, args))
        logging.info("size %d: %s done in %.0fs: %s", size, factory,
                     time.perf_counter() - t0, rows[-1])
    return rows


def _bench_flat(base: np.ndarray, q: np.ndarray, exact_s: float, args: argparse.Namespace) -> Row:
    index = VectorIndex.build(base.shape[1], "Flat")
    before = rss_mb()
    started = time.perf_counter()
    index.add(np.arange(len(base), dtype=np.int64), base)
    build_s = time.perf_counter() - started
    memory = rss_mb() - before
    with quiet_cpu(args.lock):
        single = single_qps(lambda x: index.search(x, K, SearchKnobs()), q, args.single_budget)
    note = "batched = the ground-truth scan (unlocked)"
    return Row(len(base), "Flat", build_s, memory, 1.0, single, len(q) / exact_s, "-", note)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\nrecall@{K} vs exact; params tuned to reach {args.target} (95% lower confidence bound) "
          "on separate queries\n")
    print("| items | index | build s | memory MiB | recall@10 | single q/s | batched q/s "
          "| params | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r.size:,} | {r.index} | {r.build_s:.1f} | {r.memory_mb:,.0f} | {r.recall:.3f} "
              f"| {r.single_qps:,.0f} | {r.batched_qps:,.0f} | {r.params} | {r.note} |")


if __name__ == "__main__":
    main()
