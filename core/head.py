"""Classification: the head trained on embeddings and the self-describing model file around it,
and the kNN vote over labelled neighbours.

A model file (``pictor train``) holds everything needed to classify with the head and to
check that it fits an index: the embedding space (``ModelSpec``, with ``finetune`` set to a
fingerprint of fine-tuned backbone weights), the head weights and class names, the changed
backbone weights (finetune mode only), training config, validation metrics, a fingerprint of
the training data, library versions and the open-set rule (``pictor.core.open_set``). It is a
``torch.save`` of plain containers, so ``torch.load(weights_only=True)`` reads it without running pickled code.

Example::

    model = load_model("flowers.pt")
    embedder = model.create_embedder()
    probs = model.predict_proba(embedder.embed(images))   # [N, len(model.class_names)]
"""

from __future__ import annotations

import io
import logging
import math
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pictor.core.embedder import Embedder, embedder_for_spec, fingerprint_state, kept_precision
from pictor.core.files import (
    content_hash,
    damaged_member,
    remove_leftovers,
    why_not_tensors,
    write_atomic,
    write_failure,
)
from pictor.core.open_set import OpenSet
from pictor.core.spec import ModelSpec
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

MODEL_FORMAT = "pictor.model"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- top k, kNN vote


def top_k_labels(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(name, probability)`` pairs of one probability vector (of equal
    ones, the first: as ``argmax`` answers)."""
    return [(names[i], float(probs[i])) for i in np.argsort(-probs, kind="stable")[:k]]


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


def content_ids(content_hashes: Sequence[str]) -> torch.Tensor:
    """Files' content hashes (hex SHA-256, ``core.files.content_hash``) as 8-byte ids: 8 bytes an
    image in a model file, and a chance collision is ~1e-9 even among 100k x 100k images."""
    return torch.tensor([int.from_bytes(bytes.fromhex(h[:16]), "big", signed=True) for h in content_hashes],
                        dtype=torch.int64)


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
    # The training and validation images' ids (content_ids): eval says when it measures on them.
    training_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    validation_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    file_sha256: str = ""  # of the file it was read from (load_model), which does not hold it

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

    def trained_on(self, content_hashes: Sequence[str]) -> np.ndarray:
        """Which of these files (by content hash) were training images of this model."""
        return np.isin(content_ids(content_hashes).numpy(), self.training_images.numpy())

    def validated_on(self, content_hashes: Sequence[str]) -> np.ndarray:
        """Which of these files (by content hash) were validation images of this model."""
        return np.isin(content_ids(content_hashes).numpy(), self.validation_images.numpy())

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

    def predict_proba(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities ``[N, C]`` (float64: in float32 those of logits 104 below the best
        are all 0, and the ranks among them lost), columns in ``class_names`` order."""
        return torch.softmax(self.logits(embeddings).double(), dim=1).numpy()

    def top_k(self, embeddings: np.ndarray | torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
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
        precision = kept_precision(precision, trained, device)
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
        self.warn_of_precision(emb.precision)
        return emb

    def warn_of_precision(self, precision: str) -> None:
        """Say so when this head will take embeddings of another precision than it was trained on."""
        trained = str(self.training.get("precision", "auto"))
        if trained not in ("auto", precision):
            log.warning("this model was trained and calibrated on %s embeddings, which are computed in "
                        "%s here: its scores and unknown answers can differ a little from its "
                        "validation figures", trained, precision)

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
            "training_images": self.training_images.clone(),
            "validation_images": self.validation_images.clone(),
            "versions": dict(self.versions),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model file atomically (a reader never sees half a file)."""
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(p.parent, f"{p.name}.", ".tmp")  # of a run killed while it wrote
            write_atomic(p, lambda f: torch.save(self.to_dict(), f))
        except (OSError, RuntimeError) as e:  # after minutes of training: a message, not a traceback
            # torch.save reports a failed write as RuntimeError ("unexpected pos"), the OSError its context
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError):
                raise
            raise write_failure(f"the model file {p}", cause, "train again") from e
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
                # (files from before it have none)
                training_images=d.get("training_images", torch.zeros(0, dtype=torch.int64)).long().flatten(),
                validation_images=d.get("validation_images", torch.zeros(0, dtype=torch.int64)).long().flatten(),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # a field of another type
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
    if p.exists() and not p.is_file():  # a pipe or a device: reading it may never end
        raise InvalidRequestError(f"{p} is not a regular file, not a model file (make one with `pictor train`)")
    if not p.is_file():
        raise NotFoundError(f"model file {p} does not exist")
    try:
        data = p.read_bytes()  # read once: the bytes checked, hashed and loaded are the same
    except OSError as e:
        raise NotFoundError(f"model file {p} cannot be read: {e.strerror or e}") from e
    if damaged := damaged_member(io.BytesIO(data)):
        raise IncompatibleModelError(f"model file {p} is damaged ({damaged}): copy it again, or train again")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning: its error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file can fail the unpickler in any way (a cut one: OSError)
        raise IncompatibleModelError(
            f"{p} is not a Pictor model file (make one with `pictor train`): {why_not_tensors(p, e)}") from e
    model = TrainedModel.from_dict(d, source=str(p))
    model.file_sha256 = content_hash(data)
    return model


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
