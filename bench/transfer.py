"""Transfer-learning benchmark: linear probe, fine-tuning and kNN on one labelled folder.

Splits off a seeded, stratified validation share (25% by default), then reports validation
top-1 and wall time for each mode with the default (offline) backbone, plus the open-set
check: one class left out of training entirely (each class in turn), its validation images
should come back "unknown" while the known classes' images keep their label. The open-set
table also shows the best the same rule could do with thresholds chosen knowing the real
unknowns (upper bounds, not results): within the calibration budget of known images
rejected, and at the issue's operating point (90% of known images keep their correct label).
``--far-data`` adds the far check: the model (``--open-set-mode``) of the whole split against
images of other datasets, unlike every class (cats and trucks for a flower model), which
should all come back "unknown", with and without the rule's far-neighbour test.

Each mode starts from an empty embedding cache, so its time includes embedding the images
(kNN reads the embeddings the linear run cached, and says so), unless ``--cache-dir`` names
a cache to reuse.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/transfer.py \\
        --data ../shared/datasets/flowers/train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pictor.core.gallery import read_gallery
from pictor.core.head import knn_vote
from pictor.core.open_set import OpenSetThresholds, calibrate_thresholds
from pictor.trainer import data as data_mod
from pictor.trainer.config import TrainConfig
from pictor.trainer.openset import nearest_similarity, neighbors
from pictor.trainer.train import Splits, build_embedder, embed_set, train

from common import machine_line, parser

log = logging.getLogger("bench.transfer")

TARGET_KEPT = 0.90  # issue 4: known images that must keep their correct label


@dataclasses.dataclass(frozen=True)
class _Hit:  # what knn_vote reads from a store hit
    label: str
    score: float


def knn_predict(queries: np.ndarray, gallery: np.ndarray, gallery_labels: Sequence[str],
                k: int = 10, *, weighted: bool = True) -> list[str]:
    """Top-1 of the server's vote (``knn_vote``) of the ``k`` nearest gallery items."""
    sims, idx = neighbors(queries, gallery, k)
    preds = []
    for row_s, row_i in zip(sims, idx, strict=True):
        vote = knn_vote([_Hit(gallery_labels[i], float(s)) for s, i in zip(row_s, row_i, strict=True)],
                        weighted=weighted)
        preds.append(vote[0][0] if vote else "")
    return preds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="image-folder tree (one folder per class)")
    p.add_argument("--modes", default="linear,finetune,knn,openset",
                   help="comma-separated subset of linear,finetune,knn,openset,far")
    p.add_argument("--backbone", default=TrainConfig.backbone,
                   help="see `pictor models`")
    p.add_argument("--weights", default="",
                   help="weights tag or checkpoint path (\"\" = the backbone's default)")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of each class split off for validation (`pictor train`: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="of the split and of training")
    p.add_argument("--max-per-class", type=int, default=0, help="cap images per class (0 = all)")
    p.add_argument("--epochs", type=int, default=8, help="finetune epochs (upper bound)")
    p.add_argument("--unfreeze", type=int, default=TrainConfig.unfreeze,
                   help="finetune: last N stages trained")
    p.add_argument("--train-size", type=int, default=0,
                   help="finetune crop size (0 = 7/8 of the input size, rounded to 32: 192 for 224)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="finetune: head LR")
    p.add_argument("--backbone-lr", type=float, default=TrainConfig.backbone_lr,
                   help="finetune: LR of the unfrozen stages")
    p.add_argument("--mixup", type=float, default=TrainConfig.mixup,
                   help="finetune: mixup Beta alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=TrainConfig.cutmix,
                   help="finetune: CutMix Beta alpha (0 = off)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and per forward pass")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: embedding in bf16 where the CPU computes it natively, fine-tuning in fp32 on a CPU")
    p.add_argument("--k", type=int, default=10, help="kNN: neighbours voting")
    p.add_argument("--open-set-class", default="all",
                   help="class left out for the open-set check (all: each in turn)")
    p.add_argument("--open-set-mode", default="linear", choices=("linear", "finetune"),
                   help="head the openset and far modes train")
    p.add_argument("--max-known-rejected", type=float, default=0.05,
                   help="open set: share of known validation images the calibration may reject")
    p.add_argument("--far-data", action="append", default=[], metavar="DIR",
                   help="far mode: images unlike every class (folder or manifest; repeatable)")
    p.add_argument("--far-max", type=int, default=1000, help="far mode: images sampled per --far-data")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--save-dir", default="", help="keep the trained model files here")
    p.add_argument("--cache-dir", default="",
                   help="embedding cache to reuse (\"\" = a fresh one, so times include embedding)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_for(args: argparse.Namespace, mode: str, cache_dir: str) -> TrainConfig:
    return TrainConfig(
        mode=mode, backbone=args.backbone, weights=args.weights, precision=args.precision,
        val_fraction=args.val_fraction, seed=args.seed,
        max_per_class=args.max_per_class, epochs=args.epochs, unfreeze=args.unfreeze,
        train_size=args.train_size, batch_size=args.batch_size, cache_dir=cache_dir,
        lr=args.lr, backbone_lr=args.backbone_lr, mixup=args.mixup, cutmix=args.cutmix,
        max_known_rejected=args.max_known_rejected, progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace, mode: str, splits: Splits, cache_dir: str
              ) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(args.save_dir) / f"{mode}.pt" if args.save_dir else None
    result = train(config_for(args, mode, cache_dir), args.data, splits=splits, out=out)
    m = result.model.metrics
    row = {"mode": mode, "top1": result.report["top1"], "top5": result.report["top5"],
           "macro_f1": result.report["macro_f1"], "seconds": time.perf_counter() - t0,
           "train": m["train_images"], "val": result.report["n"],
           "skipped": m["skipped_images"]}
    if mode == "linear":
        row["note"] = f"weight decay {m['weight_decay']:g}, train views plain+mirror"
    else:
        row["note"] = (f"linear probe {m['linear_probe_val_accuracy']:.4f}, best epoch "
                       f"{m['best_epoch']}/{m['epochs_run']}, served head: {m['head']} "
                       f"(joint {m['joint_head_val_accuracy']:.4f}, refit "
                       f"{m['refit_head_val_accuracy']:.4f})")
    return row


def run_knn(args: argparse.Namespace, splits: Splits, cache_dir: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    config = config_for(args, "linear", cache_dir)
    embedder = build_embedder(config)
    tr, stats_tr = embed_set(splits.train, embedder, config, "train")
    va, stats_va = embed_set(splits.val, embedder, config, "val")
    t_vote = time.perf_counter()
    preds = knn_predict(va.embeddings, tr.embeddings, tr.labels, k=args.k, weighted=True)
    top1 = float(np.mean([p == y for p, y in zip(preds, va.labels, strict=True)]))
    hits = stats_tr["hits"] + stats_va["hits"]
    return {"mode": f"knn (k={args.k}, weighted)", "top1": top1, "top5": None,
            "macro_f1": None, "seconds": time.perf_counter() - t0,
            "train": len(tr.samples), "val": len(va.samples),
            "skipped": len(tr.skipped) + len(va.skipped),
            "note": f"embeddings from the linear run's cache ({hits} hits); vote "
                    f"{time.perf_counter() - t_vote:.2f}s"}


def run_open_set(args: argparse.Namespace, splits: Splits, cache_dir: str
                 ) -> list[dict[str, Any]]:
    """Train without one class (each in turn, or the one asked for); score the unknowns."""
    names = data_mod.class_names(splits.train)
    held_out = names if args.open_set_class in ("", "all") else [args.open_set_class]
    for held in held_out:
        if held not in names:
            raise SystemExit(f"--open-set-class {held!r} is not one of {names}")
    return [open_set_one(args, splits, cache_dir, held) for held in held_out]


def open_set_one(args: argparse.Namespace, splits: Splits, cache_dir: str, held: str
                 ) -> dict[str, Any]:
    known = Splits([s for s in splits.train if s.label != held],
                   [s for s in splits.val if s.label != held])
    t0 = time.perf_counter()
    config = config_for(args, args.open_set_mode, cache_dir)
    embedder = build_embedder(config)
    result = train(config, args.data, splits=known, embedder=embedder)
    model = result.model
    assert model.open_set is not None
    # The index at serving time: the training images, embedded by the model's own backbone.
    tr, _ = embed_set(known.train, embedder, config, "index")
    va, _ = embed_set(splits.val, embedder, config, "val")
    probs = model.predict_proba(va.embeddings)
    fit = model.open_set.gaussians.score(va.embeddings)
    sim = nearest_similarity(va.embeddings, tr.embeddings)
    is_held = np.array([lab == held for lab in va.labels])
    correct = np.array([model.class_names[i] == y
                        for i, y in zip(probs.argmax(1), va.labels, strict=True)])

    def score(th: OpenSetThresholds) -> tuple[float, float]:
        unknown = th.is_unknown(fit, sim)
        return float(unknown[is_held].mean()), float((~unknown & correct)[~is_held].mean())

    rejected, kept = score(model.open_set.thresholds)
    # Upper bound of the same rule: thresholds chosen knowing the real unknowns.
    oracle = calibrate_thresholds(fit[~is_held], sim[~is_held], unknown_fit=fit[is_held],
                                  unknown_similarity=sim[is_held],
                                  max_known_rejected=args.max_known_rejected)
    oracle_rejected, oracle_kept = score(oracle)
    target_rejected = best_at_target(fit, sim, is_held, correct)
    return {
        "held_out": held, "mode": args.open_set_mode,
        "unknown_rejected": rejected, "known_kept": kept,
        "known_top1_closed_set": float(correct[~is_held].mean()),
        "oracle_unknown_rejected": oracle_rejected, "oracle_known_kept": oracle_kept,
        "oracle_unknown_rejected_at_target": target_rejected,
        "thresholds": model.open_set.thresholds.to_dict(),
        "n_unknown": int(is_held.sum()), "n_known": int((~is_held).sum()),
        "seconds": time.perf_counter() - t0,
    }


def run_far(args: argparse.Namespace, splits: Splits, cache_dir: str) -> list[dict[str, Any]]:
    """The model of the split (--open-set-mode) against its validation images and each
    --far-data set; a fine-tuned model embeds them with its own backbone."""
    config = config_for(args, args.open_set_mode, cache_dir)
    embedder = build_embedder(config)
    model = train(config, args.data, splits=splits, embedder=embedder).model
    assert model.open_set is not None
    index, _ = embed_set(splits.train, embedder, config, "index")
    sets = [("known: validation split", splits.val)]
    rng = np.random.default_rng(args.seed)
    for far in args.far_data:
        entries = list(read_gallery(far))
        pick = sorted(rng.choice(len(entries), min(args.far_max, len(entries)), replace=False))
        sets.append((far, [data_mod.Sample(entries[i].path, "far") for i in pick]))
    rows = []
    for name, samples in sets:
        emb, _ = embed_set(samples, embedder, config, "far")
        fit = model.open_set.gaussians.score(emb.embeddings)
        sim = nearest_similarity(emb.embeddings, index.embeddings)
        th = model.open_set.thresholds
        pair_only = dataclasses.replace(th, far_similarity=-np.inf)
        rows.append({"data": name, "n": len(emb.samples),
                     "unknown": float(th.is_unknown(fit, sim).mean()),
                     "unknown_pair_only": float(pair_only.is_unknown(fit, sim).mean()),
                     # As served over an index without comparable neighbours (whitened, or
                     # lacking some of the model's classes): the class fit alone.
                     "unknown_fit_alone": float(th.is_unknown(fit, np.full_like(sim, np.nan)).mean()),
                     "median_similarity": float(np.median(sim)), "thresholds": th.to_dict(),
                     "mode": args.open_set_mode})
    return rows


def best_at_target(fit: np.ndarray, sim: np.ndarray, is_held: np.ndarray, correct: np.ndarray,
                   kept: float = TARGET_KEPT) -> float:
    """Most unknowns the rule can reject (thresholds knowing them) keeping ``kept`` of the known.

    Known images keep their label when correct and not rejected, so the budget is a share of
    the correctly classified ones: 1 - kept / closed-set accuracy (none when below ``kept``).
    """
    known_ok = correct & ~is_held
    accuracy = known_ok.sum() / max((~is_held).sum(), 1)
    if accuracy < kept or not is_held.any():
        return 0.0
    th = calibrate_thresholds(fit[known_ok], sim[known_ok], unknown_fit=fit[is_held],
                              unknown_similarity=sim[is_held],
                              max_known_rejected=1.0 - kept / accuracy)
    return float(th.is_unknown(fit[is_held], sim[is_held]).mean())


def print_table(rows: list[dict[str, Any]], open_set: list[dict[str, Any]], far: list[dict[str, Any]],
                data: str) -> None:
    print(f"\ndata: {data}")
    if rows:
        print("| mode | train / val images | top-1 | top-5 | macro F1 | wall time | note |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        top5 = "-" if r["top5"] is None else f"{r['top5']:.4f}"  # (5 classes or fewer: always 1)
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}"
        print(f"| {r['mode']} | {r['train']} / {r['val']} | {r['top1']:.4f} | {top5} | {f1} | "
              f"{r['seconds']:.0f} s | {r['note']} |")
    if far:
        t = far[0]["thresholds"]
        print(f"\nfar check ({far[0]['mode']} head of the split; index = its training images; thresholds: class "
              f"fit {t['class_fit']:.1f} and similarity {t['neighbor_similarity']:.3f}, or similarity "
              f"{t['far_similarity']:.3f}; without neighbours class fit {t['class_fit_alone']:.1f}):")
        print("| images | n | answered unknown | without the far test | class fit alone (no "
              "neighbours) | median nearest similarity |")
        print("|---|---|---|---|---|---|")
        for f in far:
            print(f"| {f['data']} | {f['n']} | {f['unknown']:.1%} | {f['unknown_pair_only']:.1%} | "
                  f"{f['unknown_fit_alone']:.1%} | {f['median_similarity']:.3f} |")
    if not open_set:
        return
    print(f"\nopen set ({open_set[0]['mode']} head; one class left out of training; known "
          "images rejected at most about the calibration budget):")
    print("| left out | unknown answered unknown | known keep correct label | closed-set top-1 "
          "| thresholds (class fit, sim; far sim) | same rule, oracle thresholds: unknown / known kept "
          f"| oracle at {TARGET_KEPT:.0%} kept: unknown |")
    print("|---|---|---|---|---|---|---|")
    for o in open_set:
        t = o["thresholds"]
        print(f"| {o['held_out']} ({o['n_unknown']}) | {o['unknown_rejected']:.1%} | "
              f"{o['known_kept']:.1%} of {o['n_known']} | {o['known_top1_closed_set']:.1%} | "
              f"{t['class_fit']:.1f}, {t['neighbor_similarity']:.3f}; {t.get('far_similarity', -np.inf):.3f} | "
              f"{o['oracle_unknown_rejected']:.1%} / {o['oracle_known_kept']:.1%} | "
              f"{o['oracle_unknown_rejected_at_target']:.1%} |")
    mean = {k: float(np.mean([o[k] for o in open_set])) for k in
            ("unknown_rejected", "known_kept", "known_top1_closed_set",
             "oracle_unknown_rejected", "oracle_known_kept", "oracle_unknown_rejected_at_target")}
    print(f"| mean | {mean['unknown_rejected']:.1%} | {mean['known_kept']:.1%} | "
          f"{mean['known_top1_closed_set']:.1%} | | {mean['oracle_unknown_rejected']:.1%} / "
          f"{mean['oracle_known_kept']:.1%} | {mean['oracle_unknown_rejected_at_target']:.1%} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(machine_line(), flush=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "far" in modes and not args.far_data:
        raise SystemExit("mode far needs --far-data DIR (images unlike every class of --data)")
    base = TrainConfig(val_fraction=args.val_fraction, seed=args.seed)
    samples = data_mod.cap_per_class(data_mod.load_samples(args.data), args.max_per_class,
                                     args.seed)
    train_s, val_s = data_mod.stratified_split(samples, base.val_fraction, base.seed)
    splits = Splits(train_s, val_s)
    rows: list[dict[str, Any]] = []
    open_set: list[dict[str, Any]] = []
    far: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pictor-bench-") as tmp:
        linear_cache = args.cache_dir or str(Path(tmp) / "linear")
        for mode in modes:
            if mode == "linear":
                rows.append(run_train(args, "linear", splits, linear_cache))
            elif mode == "finetune":
                rows.append(run_train(args, "finetune", splits, str(Path(tmp) / "finetune")))
            elif mode == "knn":
                rows.append(run_knn(args, splits, linear_cache))
            elif mode == "openset":
                open_set = run_open_set(args, splits, linear_cache)
            elif mode == "far":
                far = run_far(args, splits, linear_cache)
            else:
                raise SystemExit(f"unknown mode {mode!r}")
    print_table(rows, open_set, far, f"{args.data}, backbone {args.backbone} {args.weights}".rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "open_set": open_set, "far": far}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
