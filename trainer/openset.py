"""Open-set calibration and kNN on embeddings: the training-time stand-ins for the index.

At serving time, "unknown" needs two scores: the head's top-1 probability and the cosine
similarity of the nearest indexed image. In training the index is played by the training
embeddings, and unknowns by each known class in turn: a head fitted without class ``c`` sees
``c``'s validation images as unknowns (leave-one-class-out). Thresholds are then chosen to
reject as many of those as possible while rejecting at most a budget of known images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pictor.core.head import OpenSetThresholds, calibrate_thresholds, knn_vote
from pictor.trainer.linear import class_weights, fit_head, fit_temperature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Hit:  # what knn_vote reads from a store hit
    label: str
    score: float


def neighbors(queries: np.ndarray, gallery: np.ndarray, k: int, block: int = 1024
              ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours: (similarities, indices), each ``[N, k]``."""
    k = min(k, len(gallery))
    sims_out = np.empty((len(queries), k), dtype=np.float32)
    idx_out = np.empty((len(queries), k), dtype=np.int64)
    g = torch.as_tensor(gallery, dtype=torch.float32)
    for start in range(0, len(queries), block):  # bounded memory for large sets
        q = torch.as_tensor(queries[start:start + block], dtype=torch.float32)
        sims, idx = torch.topk(q @ g.T, k, dim=1)
        sims_out[start:start + len(q)] = sims.numpy()
        idx_out[start:start + len(q)] = idx.numpy()
    return sims_out, idx_out


def knn_predict(queries: np.ndarray, gallery: np.ndarray, gallery_labels: Sequence[str],
                k: int = 10, *, weighted: bool = True) -> list[str]:
    """Top-1 of the (similarity-weighted) vote of the ``k`` nearest gallery items."""
    sims, idx = neighbors(queries, gallery, k)
    preds = []
    for row_s, row_i in zip(sims, idx, strict=True):
        vote = knn_vote([_Hit(gallery_labels[i], float(s)) for s, i in zip(row_s, row_i,
                                                                            strict=True)],
                        weighted=weighted)
        preds.append(vote[0][0] if vote else "")
    return preds


def nearest_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query's nearest gallery embedding (embeddings are unit)."""
    if len(gallery) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32)
    return neighbors(queries, gallery, 1)[0][:, 0]


@dataclass(frozen=True)
class OpenSetCalibration:
    thresholds: OpenSetThresholds
    pseudo_unknown_rejected: float  # leave-one-class-out unknowns answered "unknown"
    pseudo_known_rejected: float  # known images of those heads answered "unknown"


def calibrate_open_set(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    weight_decay: float,
    *,
    max_known_rejected: float = 0.05,
    balance: bool = True,
    seed: int = 0,
) -> OpenSetCalibration:
    """Thresholds from leave-one-class-out heads (needs 3+ classes), else known quantiles.

    ``x_*`` are unit embeddings of the plain (unaugmented) images.
    """
    known_c: list[np.ndarray] = []
    known_s: list[np.ndarray] = []
    unk_c: list[np.ndarray] = []
    unk_s: list[np.ndarray] = []
    if num_classes >= 3:
        for c in range(num_classes):
            kc, ks, uc, us = _held_out_scores(
                x_train, y_train, x_val, y_val, num_classes, c, weight_decay, balance, seed
            )
            known_c.append(kc)
            known_s.append(ks)
            unk_c.append(uc)
            unk_s.append(us)
    else:  # with 2 classes a held-out head has one class: no signal, use known scores only
        head = fit_head(x_train, y_train, num_classes, weight_decay, seed=seed)
        with torch.no_grad():
            logits = head(torch.as_tensor(x_val))
        t = fit_temperature(logits, y_val)
        known_c.append(torch.softmax(logits / t, 1).max(1).values.numpy())
        known_s.append(nearest_similarity(x_val, x_train))
    kc_all, ks_all = np.concatenate(known_c), np.concatenate(known_s)
    uc_all = np.concatenate(unk_c) if unk_c else None
    us_all = np.concatenate(unk_s) if unk_s else None
    th = calibrate_thresholds(kc_all, ks_all, unknown_confidence=uc_all,
                              unknown_similarity=us_all, max_known_rejected=max_known_rejected)
    known_rej = float(np.mean((kc_all < th.head_confidence) & (ks_all < th.neighbor_similarity)))
    unk_rej = (
        float(np.mean((uc_all < th.head_confidence) & (us_all < th.neighbor_similarity)))
        if uc_all is not None and us_all is not None and len(uc_all) else 0.0
    )
    log.info("open-set thresholds: head confidence < %.3f and neighbour similarity < %.3f "
             "(held-out classes rejected %.1f%%, known rejected %.1f%%)",
             th.head_confidence, th.neighbor_similarity, 100 * unk_rej, 100 * known_rej)
    return OpenSetCalibration(th, unk_rej, known_rej)


def _held_out_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    num_classes: int, held: int, weight_decay: float, balance: bool, seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(known conf, known sim, unknown conf, unknown sim) of a head fitted without ``held``."""
    keep = y_train != held
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[[c for c in range(num_classes) if c != held]] = np.arange(num_classes - 1)
    xt, yt = x_train[keep], remap[y_train[keep]]
    weights = class_weights(yt, num_classes - 1) if balance else None
    head = fit_head(xt, yt, num_classes - 1, weight_decay, weights=weights, seed=seed)
    known = y_val != held
    with torch.no_grad():
        logits = head(torch.as_tensor(x_val))
    t = fit_temperature(logits[known], remap[y_val[known]]) if known.any() else 1.0
    conf = torch.softmax(logits / t, 1).max(1).values.numpy()
    sim = nearest_similarity(x_val, xt)
    return conf[known], sim[known], conf[~known], sim[~known]
