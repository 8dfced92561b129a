"""PCA candidates re-ranked on the full vectors, on real embeddings: how many each PCA size needs.

`auto` indexes embedding-sized vectors as an IVF over PCA-reduced 8-bit codes whose
candidates (``k_factor`` x 10) are re-ranked on the full vectors. This isolates the PCA
half on real images: exact search in the PCA space (no IVF, no quantisation), its top
10 x k_factor re-ranked by exact cosine on the full embeddings, recall@10 against exact
search on the full embeddings. The items are every image under the ``--data`` folders;
``--queries`` of them, drawn at random, are searched against the others. PCA is fitted on
the items, as `auto` trains it on a sample of the collection.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/pca_rerank.py \\
        --data ../shared/datasets/flowers/train ../shared/datasets/cifar10/train \\
        ../shared/datasets/emoji/google
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import faiss
import numpy as np

from pictor.core.embedder import create_embedder
from pictor.core.gallery import read_gallery
from pictor.indexer.pipeline import embedded_batches

from common import machine_line, parser

K = 10


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data", nargs="+", required=True, help="image folders (searched recursively)")
    p.add_argument("--dims", default="64,128,256,512", help="comma-separated PCA sizes")
    p.add_argument("--k-factors", default="1,2,4,6,8,12,16", help="candidates per wanted hit")
    p.add_argument("--queries", type=int, default=500, help="items drawn at random as queries")
    p.add_argument("--backbone", default="efficientnet_lite0", help="see `pictor models`")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="of the query draw")
    return p.parse_args(argv)


def rerank_recall(items: np.ndarray, queries: np.ndarray, truth: np.ndarray, dim: int,
                  k_factors: Sequence[int]) -> tuple[float, list[float]]:
    """(variance kept by PCA-``dim``, recall@10 after re-ranking 10 x f candidates, per f)."""
    pca = faiss.PCAMatrix(items.shape[1], dim)
    pca.train(items)
    eigen = faiss.vector_to_array(pca.eigenvalues)
    reduced = faiss.IndexFlatIP(dim)
    reduced.add(pca.apply(items))
    _, candidates = reduced.search(pca.apply(queries), K * max(k_factors))
    recalls = []
    for f in k_factors:
        cand = candidates[:, : K * f]
        scores = np.einsum("qcd,qd->qc", items[cand], queries)
        top = np.take_along_axis(cand, np.argsort(-scores, axis=1)[:, :K], axis=1)
        recalls.append(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(top, truth, strict=True)])))
    return float(eigen[:dim].sum() / eigen.sum()), recalls


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_line(), flush=True)
    embedder = create_embedder(args.backbone)
    entries = [e for folder in args.data for e in read_gallery(folder, labels="none")]
    started = time.perf_counter()
    batches = embedded_batches(entries, embedder, batch_size=args.batch_size, workers=2,
                               max_pixels=40_000_000)
    x = np.concatenate([vectors for _, vectors in batches])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    embedded_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    is_query = np.zeros(len(x), bool)
    is_query[rng.choice(len(x), args.queries, replace=False)] = True
    items, queries = np.ascontiguousarray(x[~is_query]), np.ascontiguousarray(x[is_query])
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    _, truth = exact.search(queries, K)
    factors = [int(f) for f in args.k_factors.split(",")]
    print(f"# {args.backbone} ({items.shape[1]}-d): {len(items)} items, {len(queries)} queries; "
          f"embedded in {embedded_s:.0f}s")
    print("| PCA | variance kept | " + " | ".join(f"k_factor {f}" for f in factors) + " |")
    print("|---|---|" + "---|" * len(factors))
    for dim in (int(d) for d in args.dims.split(",")):
        kept, recalls = rerank_recall(items, queries, truth, dim, factors)
        print(f"| {dim} | {kept:.2f} | " + " | ".join(f"{r:.3f}" for r in recalls) + " |")


if __name__ == "__main__":
    main()
