"""Open-set rejection: when Classify answers "unknown" instead of forcing a class.

Two scores per image: how well its embedding fits class-conditional Gaussians (``ClassGaussians``,
the relative Mahalanobis score) and the cosine similarity of the nearest indexed item of the
model's classes. ``OpenSetThresholds`` holds the rule over them; thresholds are calibrated in
training (``calibrate_thresholds``; ``pictor.trainer.openset`` plays the index with training
embeddings) and stored in the model file (``pictor.core.head``). The store-facing helpers say
whether a served index can give the neighbour similarity, and measure it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike

from pictor.errors import IncompatibleModelError, InvalidRequestError

if TYPE_CHECKING:
    from pictor.core.store import IndexStore

OPEN_SET_SCORE = "relative_mahalanobis"  # what the model file's thresholds compare with


@dataclass(frozen=True)
class ClassGaussians:
    """Class-conditional Gaussians with one shared covariance, in a PCA space of the embeddings.

    ``score`` is the relative Mahalanobis score (Lee et al. 2018; Ren et al. 2021): minus the
    smallest squared distance to a class mean, relative to the distance to one Gaussian over
    all training data. Higher means "like a known class". The background term removes what
    every image shares, so images near the data but far from every class centre score low.
    Plain tensors, so a model file stays loadable with ``weights_only``.
    """

    center: torch.Tensor  # [dim]: mean of the training embeddings
    basis: torch.Tensor  # [dim, k]: top-k principal directions
    class_means: torch.Tensor  # [C, k]
    precision: torch.Tensor  # [k, k]: inverse of the shared (shrunk) within-class covariance
    background_mean: torch.Tensor  # [k]
    background_precision: torch.Tensor  # [k, k]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int, *, shrinkage: float = 0.1,
            max_dim: int = 256) -> ClassGaussians:
        """Fit on embeddings ``x [N, dim]`` with integer labels ``y`` (every class present).

        The PCA space keeps at most ``max_dim`` and at most ``N // 4`` directions: a
        covariance is only estimated well from several samples per dimension.
        """
        x = np.asarray(x, dtype=np.float64)
        if len(x) < 2 or np.bincount(y, minlength=num_classes).min() == 0:
            raise InvalidRequestError("class Gaussians need every class and 2+ embeddings")
        center = x.mean(0)
        k = max(1, min(max_dim, x.shape[1], len(x) // 4))
        basis = np.linalg.svd(x - center, full_matrices=False)[2][:k].T
        z = (x - center) @ basis
        means = np.stack([z[y == c].mean(0) for c in range(num_classes)])
        return cls(*(torch.as_tensor(a, dtype=torch.float32) for a in (
            center, basis, means, _shrunk_precision(z - means[y], shrinkage),
            np.zeros(k), _shrunk_precision(z, shrinkage),  # z is centred: background mean 0
        )))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Relative Mahalanobis score ``[N]`` (float32): higher is more like a known class."""
        z = (torch.as_tensor(np.asarray(embeddings), dtype=torch.float32) - self.center) @ self.basis
        z = z.double()  # the expanded distances below subtract large terms
        # (z-m)' P (z-m) = z'Pz - 2 z'Pm + m'Pm: [N, C] memory, where z - m would take
        # [N, C, k] (1 GB for 10,000 images of 100 classes).
        p, means = self.precision.double(), self.class_means.double()
        zp = z @ p
        d_class = (zp * z).sum(1, keepdim=True) - 2 * zp @ means.T + ((means @ p) * means).sum(1)
        zb = z - self.background_mean.double()
        d_background = ((zb @ self.background_precision.double()) * zb).sum(1)
        return (d_background - d_class.min(1).values).float().numpy()

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> ClassGaussians:
        return cls(**{f.name: d[f.name].float() for f in dataclasses.fields(cls)})


def _shrunk_precision(centred: np.ndarray, shrinkage: float) -> np.ndarray:
    """Inverse covariance, shrunk towards a scaled identity (few samples, many dims)."""
    cov = centred.T @ centred / max(len(centred), 1)
    target = np.trace(cov) / len(cov) * np.eye(len(cov))
    return np.linalg.pinv((1.0 - shrinkage) * cov + shrinkage * target + 1e-12 * np.eye(len(cov)))


class OpenSetTests(NamedTuple):
    """The open-set rule's tests that an image fails, as bool arrays (0-d for one image); it is
    "unknown" when any is True."""

    pair: np.ndarray  # class fit and nearest neighbour similarity both below their thresholds
    far: np.ndarray  # nearest neighbour farther than almost any known image's
    fit_alone: np.ndarray  # no comparable neighbour (NaN similarity), and class fit below its own threshold


@dataclass(frozen=True)
class OpenSetThresholds:
    """Open-set rejection: an image is "unknown" when BOTH scores fall below their threshold,
    or when even its nearest neighbour is farther than almost any known image's.

    ``class_fit`` compares with ``ClassGaussians.score`` of the embedding, ``neighbor_similarity``
    and ``far_similarity`` with the cosine similarity of the nearest indexed image of the
    model's classes. Calibrated in training on the validation split, with the training set's
    embeddings standing in for the index, so the neighbour tests are meaningful when the
    served index holds the training images (or a gallery like them).

    The pair is tuned on held-out known classes (near unknowns: another flower among flowers);
    ``far_similarity`` catches what is unlike every class (a cat among flowers), whose class
    fit can look ordinary because the fit score is relative. Files without it never use it.

    Without a comparable neighbour (NaN similarity: an index that is PCA-whitened or lacks some
    of the model's classes) the class fit decides alone, against ``class_fit_alone``: the pair's
    ``class_fit`` is set high because a near neighbour vetoes it, and alone it would reject most
    known images. Files without it never answer "unknown" then.
    """

    class_fit: float
    neighbor_similarity: float
    far_similarity: float = -math.inf
    class_fit_alone: float = -math.inf

    def tests(self, class_fit: ArrayLike, neighbor_similarity: ArrayLike) -> OpenSetTests:
        """Which of the rule's tests each image fails (elementwise): the one place the rule is
        computed, so that ``is_unknown`` and ``why_unknown`` cannot disagree."""
        fit = np.asarray(class_fit, dtype=np.float64)
        sim = np.asarray(neighbor_similarity, dtype=np.float64)
        # Comparisons with a NaN similarity are False: without a neighbour only fit_alone can fire.
        return OpenSetTests(
            pair=(fit < self.class_fit) & (sim < self.neighbor_similarity),
            far=sim < self.far_similarity,
            fit_alone=np.isnan(sim) & (fit < self.class_fit_alone),
        )

    def is_unknown(self, class_fit: ArrayLike, neighbor_similarity: ArrayLike) -> np.ndarray:
        """True where the image is unknown (elementwise); NaN similarity: no comparable neighbour."""
        t = self.tests(class_fit, neighbor_similarity)
        return np.asarray(t.pair | t.far | t.fit_alone)

    def why_unknown(self, class_fit: float, neighbor_similarity: float) -> str:
        """Which test made one image "unknown", in words with its figures ("" when none did)."""
        fit, sim = float(class_fit), float(neighbor_similarity)
        t = self.tests(fit, sim)
        if t.fit_alone:
            return (f"class fit {fit:.3f} < {self.class_fit_alone:.3f}, judged alone (no comparable "
                    "neighbours in the index)")
        if t.far:
            return (f"nearest indexed item of the model's classes at similarity {sim:.3f} < "
                    f"{self.far_similarity:.3f}, farther than almost any known image's")
        if t.pair:
            return (f"class fit {fit:.3f} < {self.class_fit:.3f} and nearest indexed item of the "
                    f"model's classes at similarity {sim:.3f} < {self.neighbor_similarity:.3f}")
        return ""

    def describe(self, neighbours: bool = True) -> str:
        """The rule in words, leaving out the tests that are off (-inf thresholds); without
        ``neighbours`` (none comparable in the index), the rule that applies then."""
        if not neighbours:
            return (f"unknown when class fit < {self.class_fit_alone:.3f}" if self.class_fit_alone > -math.inf
                    else "never unknown")
        tests = []
        if self.class_fit > -math.inf and self.neighbor_similarity > -math.inf:
            tests.append(f"class fit < {self.class_fit:.3f} and nearest neighbour similarity < "
                         f"{self.neighbor_similarity:.3f}")
        if self.far_similarity > -math.inf:
            tests.append(f"nearest neighbour similarity < {self.far_similarity:.3f}")
        rule = "unknown when " + ", or ".join(tests) if tests else "never unknown"
        if self.class_fit_alone > -math.inf:
            rule += f"; without comparable neighbours, when class fit < {self.class_fit_alone:.3f}"
        return rule

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpenSetThresholds:
        optional = {name: float(d.get(name, -math.inf)) for name in ("far_similarity", "class_fit_alone")}
        return cls(float(d["class_fit"]), float(d["neighbor_similarity"]), **optional)


@dataclass(frozen=True)
class OpenSet:
    """What Classify needs to answer "unknown": the class Gaussians and their thresholds."""

    gaussians: ClassGaussians
    thresholds: OpenSetThresholds

    def is_unknown(self, embeddings: np.ndarray, neighbor_similarity: ArrayLike) -> np.ndarray:
        """``[N]`` bools for embeddings ``[N, dim]`` and their nearest-neighbour similarities."""
        return self.thresholds.is_unknown(self.gaussians.score(embeddings), neighbor_similarity)

    def to_dict(self) -> dict[str, Any]:
        return {"score": OPEN_SET_SCORE, "thresholds": self.thresholds.to_dict(),
                "gaussians": self.gaussians.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpenSet:
        if d.get("score") != OPEN_SET_SCORE:
            raise IncompatibleModelError(f"unknown open-set score {d.get('score')!r}")
        return cls(ClassGaussians.from_dict(d["gaussians"]),
                   OpenSetThresholds.from_dict(d["thresholds"]))


def neighbour_tests_off(store: IndexStore, class_names: Sequence[str]) -> str | None:
    """Why the open-set neighbour tests cannot use ``store``'s similarities (None when they can).

    They need plain cosine (not PCA-whitened) to images like the training ones: items of every
    one of ``class_names``, as in training. A gallery of other things would make every image
    look far, and one holding only some classes would make the others' images look far. Without
    them (NaN similarity) the class fit decides alone.
    """
    if store.spec.whitening:
        return ("the index is PCA-whitened, so its similarities are not the plain cosine the "
                "neighbour thresholds were calibrated on")
    missing = sorted(set(class_names) - store.labels_present(class_names))
    if len(missing) == len(set(class_names)):
        return "the index holds no item labelled with the model's classes (yet)"
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return f"the index holds no item of the model's class(es) {shown} (yet)"
    return None


def nearest_known_similarity(store: IndexStore, queries: np.ndarray, class_names: Sequence[str]
                             ) -> np.ndarray:
    """Per query, the similarity of the nearest item labelled with one of ``class_names`` (NaN
    where there is none): what the open-set neighbour tests compare, since the thresholds were
    calibrated on the training images alone. Items of other labels say nothing about fitting
    the model's classes (an emoji next to indexed emoji is no flower)."""
    from pictor.core.store import Filter

    hits = store.search(queries, 1, filter=Filter(labels=list(class_names)))
    return np.array([h[0].score if h else math.nan for h in hits], dtype=np.float64)


def open_set_similarities(store: IndexStore, queries: np.ndarray, class_names: Sequence[str],
                          tests_off: str | None) -> np.ndarray:
    """Per query, the similarity the open-set neighbour tests take, as Classify and ``pictor
    eval`` both measure it: NaN for every query when the tests are off (``tests_off``: why, as
    ``neighbour_tests_off`` says), so the class fit decides alone; else ``nearest_known_similarity``."""
    if tests_off:
        return np.full(len(queries), math.nan)
    return nearest_known_similarity(store, queries, class_names)


def budget_threshold(scores: ArrayLike, share: float) -> float:
    """The threshold that leaves at most ``share`` of ``scores`` strictly below it (the rule's
    test is ``score < threshold``): an order statistic. ``np.quantile`` interpolates above it,
    and with 50 known images a 5% budget rejected 3 of them (6%)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    return float(ordered[int(share * len(ordered))])  # share < 1: within the scores


def calibrate_thresholds(
    known_fit: np.ndarray,
    known_similarity: np.ndarray,
    *,
    unknown_fit: np.ndarray | None = None,
    unknown_similarity: np.ndarray | None = None,
    max_known_rejected: float = 0.05,
) -> OpenSetThresholds:
    """Pick thresholds that reject at most ``max_known_rejected`` of the known images.

    Without examples of unknowns, the thresholds are the same quantile of each score (both must
    fall below for a rejection, so the rejected share stays under the budget). With (pseudo)
    unknowns, e.g. a known class held out of the Gaussians, the pair that rejects the most of
    them within the budget is chosen from a grid of quantiles.
    """
    kc = np.asarray(known_fit, dtype=np.float64)
    ks = np.asarray(known_similarity, dtype=np.float64)
    if kc.size == 0 or kc.shape != ks.shape:
        raise InvalidRequestError("open-set calibration needs matching, non-empty known scores")
    if not 0.0 <= max_known_rejected < 1.0:
        raise InvalidRequestError(f"max_known_rejected must be in [0, 1), got {max_known_rejected}")
    if unknown_fit is None or unknown_similarity is None or len(unknown_fit) == 0:
        q = max_known_rejected
        return OpenSetThresholds(budget_threshold(kc, q), budget_threshold(ks, q))
    uc = np.asarray(unknown_fit, dtype=np.float64)
    us = np.asarray(unknown_similarity, dtype=np.float64)
    grid = np.linspace(0.0, 1.0, 101)
    fit_cands = np.unique(np.quantile(kc, grid))
    sim_cands = np.unique(np.quantile(ks, grid))
    best: tuple[float, float, float, float] | None = None  # (rejected unknown, -rej known, tc, ts)
    for tc in fit_cands:
        low_c_known = kc < tc
        low_c_unknown = uc < tc
        for ts in sim_cands:
            rejected_known = float(np.mean(low_c_known & (ks < ts)))
            if rejected_known > max_known_rejected:
                break  # larger ts only rejects more
            rejected_unknown = float(np.mean(low_c_unknown & (us < ts)))
            cand = (rejected_unknown, -rejected_known, float(tc), float(ts))
            if best is None or cand > best:
                best = cand
    if best is None:
        return OpenSetThresholds(-math.inf, -math.inf)  # nothing fits the budget: never reject
    return OpenSetThresholds(best[2], best[3])
