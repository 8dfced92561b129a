"""PCA-whitening benchmark: cross-vendor emoji retrieval with and without `--pca-whiten`.

Indexes one vendor's drawings (the gallery) and queries with another's (the same emoji drawn
by another artist); recall@k counts a query as found when the same `file` is among its k
nearest gallery items. Whitening is fitted on the gallery embeddings only, as `pictor index
--pca-whiten DIM` does (galleries under its 10,000-image sample are fitted on in full), and
applied to gallery and queries alike, as the server does. Search is exact (cosine, like the
store's Flat index), so the figures measure the embedding space, not an approximate index.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/whitening.py \\
        --data ../shared/datasets/emoji
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pictor.core.embedder import Embedder, create_embedder
from pictor.core.gallery import GalleryEntry
from pictor.core.whitening import PCAWhitening
from pictor.indexer.pipeline import embedded_batches

from common import machine_line, parser

KS = (1, 10)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="the emoji folder (emoji.csv, <vendor>/*.png)")
    p.add_argument("--gallery", default="google", help="vendor indexed")
    p.add_argument("--queries", default="twitter", help="vendor that queries")
    p.add_argument("--dims", default="64,128,256,512", help="comma-separated --pca-whiten dims")
    p.add_argument("--fit-sizes", default="all",
                   help="comma-separated numbers of gallery images the whitening is fitted on (a seeded "
                        "random sample, as --pca-sample takes one), or all")
    p.add_argument("--backbone", default="efficientnet_lite0", help="see `pictor models`")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--precision", default="fp32", help="of embedding: fp32, bf16 or fp16")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    return p.parse_args(argv)


def shared_files(data: Path, a: str, b: str) -> list[str]:
    """Emoji that both vendors drew themselves (not a gap filled with another's drawing)."""
    with (data / "emoji.csv").open(newline="") as f:
        return [r["file"] for r in csv.DictReader(f)
                if r.get(f"has_img_{a}") == "1" and r.get(f"has_img_{b}") == "1"]


def embed_files(embedder: Embedder, folder: Path, files: Sequence[str], batch_size: int
                ) -> tuple[list[str], np.ndarray]:
    """Embeddings of the files that decode, with their names, through the indexer's pipeline."""
    entries = [GalleryEntry(key=name, path=folder / name) for name in files]
    names, parts = [], []
    for decoded, vectors in embedded_batches(entries, embedder, batch_size=batch_size, workers=2,
                                             max_pixels=40_000_000):
        names += [e.key for e in decoded.entries]
        parts.append(vectors)
    return names, np.concatenate(parts)


def recall(gallery: np.ndarray, g_names: list[str], queries: np.ndarray, q_names: list[str]
           ) -> dict[int, float]:
    """recall@k by name, exact cosine search (rows are unit-norm)."""
    top = np.argsort(-(queries @ gallery.T), axis=1)[:, :max(KS)]
    found = np.array(g_names)[top] == np.array(q_names)[:, None]
    return {k: float(found[:, :k].any(axis=1).mean()) for k in KS}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(args.device), flush=True)
    data = Path(args.data)
    files = shared_files(data, args.gallery, args.queries)
    embedder = create_embedder(args.backbone, device=args.device, precision=args.precision)
    started = time.perf_counter()
    g_names, g = embed_files(embedder, data / args.gallery, files, args.batch_size)
    q_names, q = embed_files(embedder, data / args.queries, files, args.batch_size)
    print(f"# {args.backbone} ({embedder.spec.dim}-d, {args.precision}); gallery {args.gallery} "
          f"{len(g)}, queries {args.queries} {len(q)}; embedded in {time.perf_counter() - started:.0f}s")
    print(f"| whitening | index dim | fitted on | {' | '.join(f'recall@{k}' for k in KS)} | fit |")
    print("|---|---|---|" + "---|" * len(KS) + "---|")
    base = recall(g, g_names, q, q_names)
    print(f"| none | {g.shape[1]} | - | {' | '.join(f'{base[k]:.3f}' for k in KS)} | - |")
    sizes = [len(g) if s == "all" else min(int(s), len(g)) for s in args.fit_sizes.split(",")]
    for dim in (int(d) for d in args.dims.split(",")):
        for size in (s for s in sizes if s > dim):  # (fewer images than dims cannot be fitted)
            sample = g[np.random.default_rng(0).choice(len(g), size, replace=False)] if size < len(g) else g
            t = time.perf_counter()
            w = PCAWhitening.fit(sample, dim)
            fit_s = time.perf_counter() - t
            r = recall(w.apply(g), g_names, w.apply(q), q_names)
            print(f"| --pca-whiten {dim} | {w.out_dim} | {size} | {' | '.join(f'{r[k]:.3f}' for k in KS)} | "
                  f"{fit_s:.1f}s |")


if __name__ == "__main__":
    main()
