"""Open-set score by stage: does an earlier stage of the backbone tell a held-out class apart
better than the embedding? (Multi-layer Mahalanobis, Lee et al. 2018: colour and texture
stages might separate a flower the last stage finds ordinary.)

Splits --data as bench/transfer.py does (seeded, stratified). For each stage (its output
globally average-pooled and L2-normalised) and for the embedding, with each class in turn
left out: the open-set class-fit score (relative Mahalanobis under class Gaussians, fitted
on the known classes' training images) of the validation images, then its AUROC (known
above held-out) and the share of held-out images below the score's 5th percentile on the
known ones (rejected while 95% of known images pass). The sums add the stages' scores,
standardised on the known validation images (no held-out image is used to weigh them).

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/open_set_layers.py \\
        --data ../shared/datasets/flowers/train
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pictor.core.decode import load_image
from pictor.core.embedder import Embedder, create_embedder
from pictor.core.open_set import ClassGaussians
from pictor.trainer import data as data_mod
from pictor.trainer.config import TrainConfig

from common import machine_line, parser


def stage_features(embedder: Embedder, samples: Sequence[data_mod.Sample]) -> dict[str, np.ndarray]:
    """Pooled, normalised output of every stage, and the embedding: name -> [N, channels]."""
    pooled: dict[str, list[np.ndarray]] = {}

    def keep(name: str) -> Callable[[torch.nn.Module, object, torch.Tensor], None]:
        def hook(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
            pooled.setdefault(name, []).append(out.float().mean((2, 3)).cpu().numpy())
        return hook

    stages = embedder.backbone.stages()
    for i, name in enumerate(stages):
        embedder.backbone.get_submodule(name).register_forward_hook(keep(f"stage {i}"))
    tensors = (embedder.preprocess(load_image(s.path)) for s in samples)
    pooled["embedding"] = [embedder.forward_preprocessed(tensors).embeddings]
    feats = {name: np.concatenate(parts) for name, parts in pooled.items()}
    return {name: f / np.linalg.norm(f, axis=1, keepdims=True) for name, f in feats.items()}


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(a known image scores above a held-out one), ties half (Mann-Whitney U / n1 n2)."""
    diff = known[:, None] - unknown[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="image-folder tree (one folder per class)")
    p.add_argument("--backbone", default=TrainConfig.backbone, help="see `pictor models`")
    p.add_argument("--weights", default="", help="weights reference or checkpoint path")
    p.add_argument("--precision", default="fp32", help="auto, fp32, bf16 or fp16")
    p.add_argument("--val-fraction", type=float, default=0.25, help="as bench/transfer.py: the issue's 25%% split")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--keep", type=float, default=0.95, help="known images passing the score")
    args = p.parse_args(argv)
    print(machine_line(), flush=True)

    train_s, val_s = data_mod.stratified_split(data_mod.load_samples(args.data), args.val_fraction,
                                               args.seed)
    embedder = create_embedder(args.backbone, weights=args.weights or None, device="auto",
                               precision=args.precision)
    t0 = time.perf_counter()
    feats = stage_features(embedder, train_s + val_s)
    print(f"{len(train_s)} train / {len(val_s)} validation images embedded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    names = data_mod.class_names(train_s)
    y_train = np.array([names.index(s.label) for s in train_s])
    y_val = np.array([names.index(s.label) for s in val_s])
    n = len(train_s)
    layers = list(feats)
    combos = {"sum of all": layers, "sum of last 3 + embedding": layers[-4:]}
    table: dict[str, list[tuple[float, float]]] = {k: [] for k in [*layers, *combos]}
    for held in range(len(names)):
        known_train, known_val = y_train != held, y_val != held
        labels = np.unique(y_train[known_train], return_inverse=True)[1]
        z: dict[str, np.ndarray] = {}
        for layer in layers:
            gaussians = ClassGaussians.fit(feats[layer][:n][known_train], labels, len(names) - 1)
            score = gaussians.score(feats[layer][n:]).astype(np.float64)
            z[layer] = (score - score[known_val].mean()) / score[known_val].std()
        for row in table:
            summed = np.sum([z[layer] for layer in combos.get(row, [row])], axis=0)
            known, unknown = summed[known_val], summed[~known_val]
            table[row].append((auroc(known, unknown),
                               float((unknown < np.quantile(known, 1 - args.keep)).mean())))

    print(f"\n{args.data}, backbone {args.backbone} {args.weights}".rstrip())
    print("AUROC (held-out vs known) / held-out rejected at "
          f"{args.keep:.0%} known passing, each class left out in turn\n")
    print("| features | dim | " + " | ".join(names) + " | mean AUROC | mean rejected |")
    print("|---" * (len(names) + 4) + "|")
    for row, cells in table.items():
        dim = str(feats[row].shape[1]) if row in feats else ""
        mean_auroc, mean_rejected = np.mean(cells, axis=0)
        print(f"| {row} | {dim} | " + " | ".join(f"{a:.3f} / {r:.0%}" for a, r in cells)
              + f" | {mean_auroc:.3f} | {mean_rejected:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
