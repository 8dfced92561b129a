"""Classification head trained on embeddings, and the self-describing model file around it.

A model file (``pictor train``) holds everything needed to classify with the head and to
check that it fits an index: the embedding space (``ModelSpec``, with ``finetune`` set to a
fingerprint of fine-tuned backbone weights), the head weights and class names, the changed
backbone weights (finetune mode only), training config, validation metrics, a fingerprint of
the training data, library versions and the open-set rule (class Gaussians + thresholds). It is a ``torch.save`` of plain
containers, so ``torch.load(weights_only=True)`` reads it without running pickled code.

Example::

    model = load_model("flowers.pt")
    embedder = model.create_embedder()
    probs = model.predict_proba(embedder.embed(images))   # [N, len(model.class_names)]
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from pictor.core.embedder import Embedder, embedder_for_spec, fingerprint_state, resolve_device, runs_natively
from pictor.core.files import damaged_member, why_not_tensors, write_atomic
from pictor.core.spec import ModelSpec
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError, ResourceExhaustedError

if TYPE_CHECKING:
    from pictor.core.store import IndexStore

log = logging.getLogger(__name__)

MODEL_FORMAT = "pictor.model"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- open set

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

    def describe(self) -> str:
        """The rule in words, leaving out the tests that are off (-inf thresholds)."""
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
        return OpenSetThresholds(float(np.quantile(kc, q)), float(np.quantile(ks, q)))
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


# --------------------------------------------------------------------------- kNN vote


def top_k_labels(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(name, probability)`` pairs of one probability vector."""
    return [(names[i], float(probs[i])) for i in np.argsort(-probs)[:k]]


class LabelledHit(Protocol):
    """What ``knn_vote`` needs from a search hit (``pictor.core.store.Hit`` fits: read-only
    properties, so a frozen dataclass matches too)."""

    @property
    def label(self) -> str: ...
    @property
    def score(self) -> float: ...


# Temperature of the weighted kNN vote, exp(similarity / T), as in Wu et al. 2018 ("Unsupervised
# feature learning via non-parametric instance discrimination") and DINO's kNN evaluation.
KNN_TEMPERATURE = 0.07


def knn_vote(neighbors: Sequence[LabelledHit], *, weighted: bool = True) -> list[tuple[str, float]]:
    """Vote of labelled neighbours: ``(label, score)`` best first, scores summing to 1.

    ``weighted`` weighs each neighbour by ``exp(similarity / KNN_TEMPERATURE)``, so a close
    neighbour outweighs several middling ones (an indexed copy of the image, at similarity 1,
    outvotes nine at 0.7 by 8 to 1; weights proportional to similarity let them outvote it);
    otherwise every neighbour has one vote. Unlabelled hits are ignored; no labelled hit gives
    an empty list. Ties are broken by the best single neighbour, then by label.
    """
    labelled = [h for h in neighbors if h.label]
    if not labelled:
        return []
    if weighted:
        top = max(float(h.score) for h in labelled)  # subtracted: exp stays within float range
        weights = [math.exp((float(h.score) - top) / KNN_TEMPERATURE) for h in labelled]
    else:
        weights = [1.0] * len(labelled)
    totals: dict[str, float] = {}
    best_single: dict[str, float] = {}
    for hit, w in zip(labelled, weights, strict=True):
        totals[hit.label] = totals.get(hit.label, 0.0) + w
        best_single[hit.label] = max(best_single.get(hit.label, -np.inf), float(hit.score))
    norm = sum(totals.values())
    ranked = sorted(totals, key=lambda lab: (-totals[lab], -best_single[lab], lab))
    return [(lab, totals[lab] / norm) for lab in ranked]


# --------------------------------------------------------------------------- head


class ClassifierHead(nn.Module):
    """Standardise the embedding, then a linear layer (or a one-hidden-layer MLP).

    The standardisation (training-set mean and scale) is part of the head so that weight
    decay treats every feature alike whatever the backbone's feature scale.
    """

    mean: torch.Tensor  # buffers, saved with the head
    scale: torch.Tensor

    def __init__(self, dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_classes, self.hidden = dim, num_classes, hidden
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if hidden > 0:
            self.body: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.body = nn.Linear(dim, num_classes)

    def set_standardization(self, embeddings: torch.Tensor) -> None:
        """Fit mean and scale on (training) embeddings ``[N, dim]``."""
        with torch.no_grad():
            self.mean.copy_(embeddings.mean(0))
            self.scale.copy_(embeddings.std(0).clamp_min(1e-6))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = (embeddings - self.mean) / self.scale
        return self.body(self.dropout(x))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide what a model file means."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("pictor", "torch", "torchvision", "timm", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = ""
    return versions


@dataclass
class TrainedModel:
    """A trained head plus everything that says where its inputs come from."""

    spec: ModelSpec
    class_names: list[str]
    head: ClassifierHead
    temperature: float = 1.0  # divides the logits; fitted on validation for calibrated scores
    open_set: OpenSet | None = None  # None: never answers "unknown"
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=library_versions)
    # Fine-tuned backbone tensors (names as in the embedder's backbone module); {} = as published.
    backbone_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head.dim != self.spec.dim:
            raise IncompatibleModelError(
                f"head takes {self.head.dim}-d embeddings but the model spec says "
                f"{self.spec.describe()}"
            )
        if self.head.num_classes != len(self.class_names):
            raise IncompatibleModelError(
                f"head has {self.head.num_classes} outputs for {len(self.class_names)} class names"
            )
        if self.open_set is not None:
            g = self.open_set.gaussians
            if g.center.shape[0] != self.spec.dim or g.class_means.shape[0] != len(self.class_names):
                raise IncompatibleModelError(
                    f"open-set Gaussians are for {g.center.shape[0]}-d embeddings and "
                    f"{g.class_means.shape[0]} classes, the head for {self.spec.dim}-d and "
                    f"{len(self.class_names)} classes"
                )
        if self.backbone_state and self.spec.finetune != fingerprint_state(self.backbone_state):
            raise IncompatibleModelError(
                "fine-tuned backbone weights do not match the fingerprint in the model spec"
            )

    # ---- inference

    def logits(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits ``[N, C]`` for embeddings ``[N, dim]``."""
        x = embeddings if torch.is_tensor(embeddings) else torch.from_numpy(np.asarray(embeddings))
        if x.ndim != 2 or x.shape[1] != self.spec.dim:
            raise IncompatibleModelError(
                f"embeddings of shape {tuple(x.shape)} do not fit this head, which takes "
                f"[N, {self.spec.dim}] from {self.spec.describe()}"
            )
        self.head.eval()
        with torch.no_grad():
            return self.head(x.float().cpu()) / self.temperature

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, C]`` (float32), columns in ``class_names`` order."""
        return torch.softmax(self.logits(embeddings), dim=1).numpy().astype(np.float32)

    def top_k(self, embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Best ``k`` ``(class name, probability)`` pairs per embedding."""
        return [top_k_labels(p, self.class_names, max(1, k)) for p in self.predict_proba(embeddings)]

    # ---- compatibility

    def check_index(self, index_spec: ModelSpec) -> None:
        """Refuse an index whose vectors come from another embedding space than this head's."""
        if index_spec != self.spec:
            hint = (
                " (this model fine-tunes the backbone, so the index must be built with it)"
                if self.spec.finetune
                else ""
            )
            raise IncompatibleModelError(
                f"the model's head expects embeddings from {self.spec.describe()} but the index "
                f"holds {index_spec.describe()}{hint}; rebuild the index with "
                f"`pictor index GALLERY --model MODEL`"
            )

    def create_embedder(self, device: str = "auto", precision: str = "auto",
                        compile: bool = False, weights: str | None = None) -> Embedder:
        """The backbone that feeds this head, fine-tuned weights included.

        ``weights``: where the checkpoint the model was trained from is now, when it moved
        (the model file names the path it had). Raises ``IncompatibleModelError`` when the
        backbone no longer builds the embedding space the head was trained on (e.g. a changed
        checkpoint file).
        """
        given = weights is not None
        if weights is None:
            weights = ""  # the spec's own
            if self.spec.weights.startswith("file:"):  # a local checkpoint: its path is in the config
                weights = str(self.training.get("weights") or self.spec.weights)
        # The head and its open-set thresholds were fitted on embeddings of one precision: "auto"
        # keeps it where this device computes it natively. (Files before it was kept say "auto".)
        trained = str(self.training.get("precision", "auto"))
        if (precision == "auto" and trained != "auto"
                and runs_natively(trained, resolve_device(device))):
            precision = trained
        emb = embedder_for_spec(
            self.spec, weights=weights, device=device, precision=precision, compile=compile,
            backbone_state=self.backbone_state,
            no_checkpoint=lambda path: NotFoundError(
                f"--weights {path}: no such checkpoint file; this model was trained from a local "
                "checkpoint: give that file's path" if given else
                f"the checkpoint {path} that this model was trained from does not exist; "
                "give its new place with --weights PATH"),
            mismatch=lambda built: IncompatibleModelError(
                f"the backbone builds {built.describe()} but this model was trained on "
                f"{self.spec.describe()}"),
        )
        if trained not in ("auto", emb.precision):
            log.warning("this model was trained and calibrated on %s embeddings, which are computed in "
                        "%s here: its scores and unknown answers can differ a little from its "
                        "validation figures", trained, emb.precision)
        return emb

    # ---- file

    def to_dict(self) -> dict[str, Any]:
        """The model file's content: plain containers and tensors only."""
        return {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "class_names": list(self.class_names),
            "head": {
                "kind": "mlp" if self.head.hidden else "linear",
                "dim": self.head.dim,
                "num_classes": self.head.num_classes,
                "hidden": self.head.hidden,
                "temperature": float(self.temperature),
                "state": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            },
            "backbone_state": {k: v.detach().cpu().clone() for k, v in self.backbone_state.items()},
            "open_set": self.open_set.to_dict() if self.open_set else None,
            "metrics": _plain(self.metrics),
            "training": _plain(self.training),
            "data_fingerprint": self.data_fingerprint,
            "versions": dict(self.versions),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model file atomically (a reader never sees half a file)."""
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(p, lambda f: torch.save(self.to_dict(), f))
        except OSError as e:  # after minutes of training: a message, not a traceback
            error = ResourceExhaustedError if e.errno == errno.ENOSPC else InvalidRequestError
            raise error(f"cannot write the model file {p}: {e.strerror or e}") from e
        log.info("saved model %s (%d classes, %s)", p, len(self.class_names), self.spec.describe())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model") -> TrainedModel:
        if not isinstance(d, Mapping) or d.get("format") != MODEL_FORMAT:
            raise IncompatibleModelError(
                f"{source} is not a Pictor model file (make one with `pictor train`)"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IncompatibleModelError(
                f"{source} has model format version {version}; this Pictor reads version "
                f"{FORMAT_VERSION} (retrain with this version)"
            )
        try:
            spec = ModelSpec.from_dict(d["spec"])
            h = d["head"]
            head = ClassifierHead(int(h["dim"]), int(h["num_classes"]), int(h.get("hidden", 0)))
            head.load_state_dict(h["state"])
            return cls(
                spec=spec,
                class_names=[str(c) for c in d["class_names"]],
                head=head,
                temperature=float(h.get("temperature", 1.0)),
                open_set=_open_set_from_file(d, source),
                metrics=dict(d.get("metrics") or {}),
                training=dict(d.get("training") or {}),
                data_fingerprint=str(d.get("data_fingerprint", "")),
                versions={str(k): str(v) for k, v in (d.get("versions") or {}).items()},
                backbone_state=dict(d.get("backbone_state") or {}),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IncompatibleModelError(f"{source} is a damaged Pictor model file: {e}") from e


def _open_set_from_file(d: Mapping[str, Any], source: str) -> OpenSet | None:
    """The file's open-set rule; files from before the class-Gaussian score load without one."""
    if d.get("open_set"):
        try:
            return OpenSet.from_dict(d["open_set"])
        except IncompatibleModelError as e:
            raise IncompatibleModelError(f"{source}: {e} (retrain with this version)") from e
    if d.get("thresholds"):
        log.warning("%s has open-set thresholds of an older rule (head confidence); it is served "
                    "without open-set rejection: retrain it to answer \"unknown\"", source)
    return None


def load_model(path: str | os.PathLike[str]) -> TrainedModel:
    """Read a model file written by ``pictor train`` (``weights_only``: no code is run).

    Raises ``NotFoundError`` for a missing file and ``IncompatibleModelError`` for a file that
    is not a Pictor model (another checkpoint, a damaged file, another format version).
    """
    p = Path(path)
    if p.is_dir():
        raise InvalidRequestError(f"{p} is a folder, not a model file (make one with `pictor train`)")
    if not p.is_file():
        raise NotFoundError(f"model file {p} does not exist")
    try:
        damaged = damaged_member(p)
    except OSError as e:
        raise NotFoundError(f"model file {p} cannot be read: {e.strerror or e}") from e
    if damaged:
        raise IncompatibleModelError(f"model file {p} is damaged ({damaged}): copy it again, or train again")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file can fail the unpickler in any way (a cut one: OSError)
        raise IncompatibleModelError(
            f"{p} is not a Pictor model file (make one with `pictor train`): {why_not_tensors(p, e)}") from e
    return TrainedModel.from_dict(d, source=str(p))


def _plain(value: Any) -> Any:
    """Metrics and config as plain containers (``weights_only`` refuses numpy scalars)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
