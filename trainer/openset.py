"""Open-set calibration and kNN on embeddings: the training-time stand-ins for the index.

At serving time, "unknown" needs two scores: how well the embedding fits the class Gaussians
(relative Mahalanobis score, ``pictor.core.open_set.ClassGaussians``) and the cosine similarity of
the nearest indexed image. The class-Gaussian score replaced the head's top-1 probability:
on flowers with one class held out it rejects more of the unknowns at the same cost in known
images (docs/benchmarks.md). In training the index is played by the training embeddings, and
unknowns by each known class in turn: Gaussians fitted without class ``c`` see ``c``'s
validation images as unknowns (leave-one-class-out). Thresholds are then chosen to reject as
many of those as possible while rejecting at most a budget of known images.

Held-out classes are near unknowns. Images unlike every class (a cat sent to a flower model)
are caught by a third threshold spending a small share of the budget: a nearest-neighbour
similarity below that of all but ``FAR_SHARE`` of the known validation images. For a flower
model it took CIFAR-10 photos and emoji answered "unknown" from about half to 99%, for 0.4
points of known images (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from statistics import NormalDist

import faiss
import numpy as np

from pictor.core.open_set import ClassGaussians, OpenSet, budget_threshold, calibrate_thresholds

log = logging.getLogger(__name__)

FAR_SHARE = 0.01  # of the known validation images, at most, rejected as unlike every class
FAR_MIN_IMAGES = 20  # validation images needed to set the far threshold


def neighbors(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours: (similarities, indices), each ``[N, k]``."""
    return faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(gallery, np.float32),
                     min(k, len(gallery)), metric=faiss.METRIC_INNER_PRODUCT)



def nearest_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query's nearest gallery embedding (embeddings are unit)."""
    if len(gallery) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32)
    return neighbors(queries, gallery, 1)[0][:, 0]


@dataclass(frozen=True)
class OpenSetCalibration:
    open_set: OpenSet
    pseudo_unknown_rejected: float | None  # leave-one-class-out unknowns answered "unknown" (3+ classes)
    pseudo_known_rejected: float  # known images of those fits answered "unknown"


def calibrate_open_set(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    *,
    max_known_rejected: float = 0.05,
) -> OpenSetCalibration:
    """Class Gaussians on all classes; thresholds from leave-one-class-out fits (3+ classes).

    ``x_train [V, N, dim]`` holds views of the training images, the plain ones first (the
    Gaussians use every view, the neighbour test the plain ones: what an index holds);
    ``x_val`` the plain validation embeddings. With 2 classes a held-out fit has one class
    and no signal, so the thresholds are quantiles of the known scores.
    """
    held_out = range(num_classes) if num_classes >= 3 else ()
    scores = [_held_out_scores(x_train, y_train, x_val, y_val, num_classes, c) for c in held_out]
    gaussians = _fit_gaussians(x_train, y_train, num_classes)
    val_similarity = nearest_similarity(x_val, x_train[0])  # to the whole index, as served
    if not scores:
        scores = [(gaussians.score(x_val), val_similarity, np.empty(0), np.empty(0))]
    kf, ks, uf, us = (np.concatenate(parts) for parts in zip(*scores, strict=True))
    # The far test's share comes out of the budget; the pair gets the rest.
    far_share = min(FAR_SHARE, max_known_rejected / 2)
    far = far_threshold(val_similarity, far_share)
    spent = far_share if far > -math.inf else 0.0
    th = calibrate_thresholds(kf, ks, unknown_fit=uf, unknown_similarity=us,
                              max_known_rejected=max_known_rejected - spent)
    # Without neighbours (served over a whitened or unrelated index) the class fit decides
    # alone, with the whole budget: the validation images' own fit, as the server scores it.
    alone = budget_threshold(gaussians.score(x_val), max_known_rejected)
    th = dataclasses.replace(th, far_similarity=far, class_fit_alone=alone)
    known_rej = float(np.mean(th.is_unknown(kf, ks)))
    unk_rej = float(np.mean(th.is_unknown(uf, us))) if len(uf) else None
    log.info("open-set thresholds: %s", th.describe())
    log.info("%s", _estimate_text(unk_rej, known_rej, max_known_rejected))
    return OpenSetCalibration(OpenSet(gaussians, th), unk_rej, known_rej)


def _estimate_text(unknown_rejected: float | None, known_rejected: float, budget: float) -> str:
    """What the calibration estimates, in words: its two figures are easily read as measured ones."""
    budget_text = f"budget {budget:.1%}: --max-known-rejected {budget:g}"
    if unknown_rejected is None:  # 2 classes: no class can be left out
        return (f"open set: {known_rejected:.1%} of the known validation images answered unknown ({budget_text}); "
                "with fewer than 3 classes there is no estimate for unknown classes")
    over = ("; over it here, as leaving a class out takes some known images' nearest neighbours away"
            if known_rejected > budget else "")
    return (f"open set, estimated by leaving each class out of the fit in turn as a stand-in for an unknown "
            f"class: {unknown_rejected:.1%} of the left-out class's validation images answered unknown, "
            f"and {known_rejected:.1%} of the other classes' ({budget_text}{over}); "
            "`pictor eval MODEL DATA --index INDEX` measures the served model on held-out images")


def far_threshold(similarities: np.ndarray, share: float) -> float:
    """A similarity that about ``share`` of known images fall below (-inf: too few to tell).

    The empirical quantile alone is the minimum for fewer than 1/share samples, and a new
    known image falls below the minimum of n with probability 1/(n+1). So the lower of it and
    the normal prediction bound is used, and only from ``FAR_MIN_IMAGES`` on: below that the
    spread itself is too uncertain (from 4 images a normal bound rejected 7% of new known
    images, not 1%).
    """
    if len(similarities) < FAR_MIN_IMAGES or share <= 0:
        return -math.inf
    sims = np.asarray(similarities, dtype=np.float64)
    z = NormalDist().inv_cdf(1.0 - share)
    normal = sims.mean() - z * sims.std(ddof=1) * math.sqrt(1.0 + 1.0 / len(sims))
    return float(min(budget_threshold(sims, share), normal))


def _fit_gaussians(x_views: np.ndarray, y: np.ndarray, num_classes: int) -> ClassGaussians:
    """Class Gaussians on every view of the images (views are extra samples)."""
    return ClassGaussians.fit(x_views.reshape(-1, x_views.shape[-1]),
                              np.tile(y, len(x_views)), num_classes)


def _held_out_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    num_classes: int, held: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(known fit, known sim, unknown fit, unknown sim) of Gaussians fitted without ``held``."""
    keep = y_train != held
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[[c for c in range(num_classes) if c != held]] = np.arange(num_classes - 1)
    gaussians = _fit_gaussians(x_train[:, keep], remap[y_train[keep]], num_classes - 1)
    fit = gaussians.score(x_val)
    sim = nearest_similarity(x_val, x_train[0, keep])
    known = y_val != held
    return fit[known], sim[known], fit[~known], sim[~known]
