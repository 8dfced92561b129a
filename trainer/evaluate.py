"""``pictor eval``: a model file on labelled images -> accuracy, per-class scores, confusion.

The images go through the model's own backbone (fine-tuned weights included), so the
closed-set numbers are those of Classify's head. Given the index Classify serves from, the
report of an open-set model also says how often Classify would answer "unknown": for images
of the model's classes (counted as wrong by ``top1_served``) and for images of other classes,
which the closed-set metrics leave out. Without the index there is no such figure: the rule's
neighbour tests need it, and its class-fit threshold is calibrated to be paired with them.
Unreadable images are skipped and counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pictor.config import DEFAULT_MAX_PIXELS, cache_root
from pictor.core.gallery import relative_paths_hint
from pictor.core.head import TrainedModel, top_k_labels
from pictor.core.open_set import neighbour_tests_off, open_set_similarities
from pictor.errors import InvalidRequestError
from pictor.image_files import path_text
from pictor.trainer import data as data_mod
from pictor.trainer.cache import embed_samples, skipped_rows
from pictor.trainer.metrics import classification_report

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder
    from pictor.core.store import IndexStore

log = logging.getLogger(__name__)


def evaluate(
    model: TrainedModel,
    data: str | Path,
    *,
    index: str | Path | None = None,
    embedder: Embedder | None = None,
    cache_dir: str | Path = "",
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "auto",
    precision: str = "auto",
    weights: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Classification report of ``model`` on ``data`` (folder tree or manifest).

    ``weights``: where the model's checkpoint is now, when it moved (see
    ``TrainedModel.create_embedder``).

    ``index``: the store Classify would serve from, for the open-set figures.
    ``cache_dir``: ``""`` = the default embedding cache, ``"none"`` = no cache. The report adds
    ``skipped`` (unreadable images), ``ignored`` (images of other classes, left out of the
    closed-set metrics), ``training_images`` and ``validation_images`` (how many measured are the
    model's own training or validation images; None for model files without their ids) and, for
    an open-set model with ``index``, ``open_set`` (see ``open_set_report``) to
    ``metrics.classification_report``'s keys.
    """
    from tqdm import tqdm

    if index is not None and model.open_set is None:  # before any work: --index would do nothing
        raise InvalidRequestError(
            "the model has no open-set thresholds (trained with --no-open-set): Classify never answers "
            "unknown with it, so --index has nothing to measure; leave --index out")
    samples = data_mod.load_samples(data)
    known = set(model.class_names)
    usable = [s for s in samples if s.label in known]
    ignored = len(samples) - len(usable)
    # Without the model's classes only the open-set figures can be measured (with --index).
    if not usable and index is None:
        raise InvalidRequestError(
            f"no image in {data} belongs to a class of the model ({', '.join(model.class_names)}); "
            "with --index INDEX, eval says how many of them Classify would answer unknown"
        )
    with contextlib.ExitStack() as stack:
        store = None
        if index is not None:  # before the backbone loads: a mismatch or a lock fails fast
            from pictor.core.whitening import open_index

            store, _, spec = open_index(index)
            stack.callback(store.close, snapshot=False)
            model.check_index(spec)  # the index Classify serves from holds this model's space
        if ignored:  # (after the index opened: an index a server holds is the one message)
            others = sorted({s.label for s in samples} - known)
            more = f" and {len(others) - 10} more" if len(others) > 10 else ""
            log.warning("%d image(s) of classes the model does not know are left out of the accuracy: "
                        "%s%s%s", ignored, ", ".join(map(repr, others[:10])), more,
                        data_mod.spelling_hint(others, model.class_names))
        embedder = embedder or model.create_embedder(device=device, precision=precision, weights=weights)
        model.check_index(embedder.spec)  # the embedder must feed this head's embedding space
        open_set = model.open_set if store is not None else None
        # Images of other classes are embedded only to see whether Classify calls them unknown.
        todo = samples if open_set is not None else usable
        root = cache_root(cache_dir)
        with tqdm(total=len(todo), desc="embed", unit="img", disable=not progress,
                  leave=False) as bar:
            emb, _ = embed_samples(todo, embedder, cache_root=root, batch_size=batch_size,
                                   max_pixels=max_pixels, progress=bar.update)
        is_known = np.array([lab in known for lab in emb.labels], dtype=bool)
        if usable and not is_known.any():
            raise InvalidRequestError(f"none of the {len(usable)} images in {data} could be read"
                                      + relative_paths_hint(data))
        if not len(emb.samples):  # only images of other classes, none of them readable
            raise InvalidRequestError(f"none of the {len(todo)} images in {data} could be read"
                                      + relative_paths_hint(data))
        class_index = {n: i for i, n in enumerate(model.class_names)}
        y = np.array([class_index[lab] for lab in np.array(emb.labels)[is_known]], dtype=np.int64)
        all_probs = model.predict_proba(emb.embeddings)
        probs = all_probs[is_known]
        report = classification_report(y, probs, model.class_names)
        report["images"] = image_rows(emb.samples, all_probs, model.class_names)
        report["skipped"] = skipped_rows(emb.skipped)
        report["ignored"] = ignored
        # Images the model learned from measure memory, not accuracy: said, not hidden (None: a
        # model file from before it kept their ids).
        report["training_images"] = (int(model.trained_on(emb.content_hashes)[is_known].sum())
                                     if len(model.training_images) else None)
        if report["training_images"]:
            log.warning("%d of the %d images measured are training images of the model (same content): "
                        "the figures overstate its accuracy on new images", report["training_images"],
                        int(is_known.sum()))
        # Validation images chose the model's weight decay, temperature and thresholds: measured
        # again, they give train's validation figures back, not a test on new images.
        report["validation_images"] = (int(model.validated_on(emb.content_hashes)[is_known].sum())
                                       if len(model.validation_images) else None)
        if report["validation_images"]:
            log.warning("%d of the %d images measured are validation images of the model (same content): "
                        "they chose its settings (weight decay, temperature, open-set thresholds), so the "
                        "figures repeat train's validation, not a test on new images",
                        report["validation_images"], int(is_known.sum()))
        report["precision"] = embedder.precision  # measured at (kept from training unless asked)
        if open_set is not None and store is not None:
            nearest, neighbours = nearest_similarities(model, emb.embeddings, store)
            unknown = open_set.is_unknown(emb.embeddings, nearest)
            for row, u in zip(report["images"], unknown.tolist(), strict=True):
                row["unknown"] = u
            served_right = (probs.argmax(1) == y) & ~unknown[is_known]
            other_labels = [lab for lab, k in zip(emb.labels, is_known, strict=True) if not k]
            report["open_set"] = open_set_report(unknown[is_known], served_right,
                                                 unknown[~is_known], other_labels, neighbours)
    return report


def image_rows(samples: Sequence[data_mod.Sample], probs: np.ndarray, class_names: Sequence[str]
               ) -> list[dict[str, Any]]:
    """Each image's answer, as Classify's top-1 gives it (to compare image by image)."""
    rows = []
    for s, p in zip(samples, probs, strict=True):
        [(name, probability)] = top_k_labels(p, class_names, 1)
        rows.append({"path": path_text(s.path), "label": s.label, "predicted": name, "probability": probability})
    return rows


def nearest_similarities(model: TrainedModel, embeddings: np.ndarray, store: IndexStore
                         ) -> tuple[np.ndarray, str]:
    """Each embedding's similarity to its nearest item in ``store``, as Classify's open-set
    tests take it (NaN where the server leaves them to the class fit), and a line saying
    what the similarities were measured against."""
    why = neighbour_tests_off(store, model.class_names)
    against = f"none: {why}; the class fit decides alone" if why else f"index {store.path} ({len(store)} items)"
    return open_set_similarities(store, embeddings, model.class_names, why), against


def open_set_report(known_unknown: np.ndarray, served_right: np.ndarray, other_unknown: np.ndarray,
                    other_labels: list[str], neighbours: str) -> dict[str, Any]:
    """How Classify's "unknown" answers fall: ``known_unknown`` / ``other_unknown`` are the
    per-image answers for images of the model's classes and of other classes."""
    counts = Counter(other_labels)
    answered = Counter(lab for lab, u in zip(other_labels, other_unknown, strict=True) if u)
    return {
        "neighbours": neighbours,
        "known_n": len(known_unknown),
        "known_unknown": float(known_unknown.mean()) if len(known_unknown) else None,
        "top1_served": float(served_right.mean()) if len(served_right) else None,
        "other_n": len(other_labels),
        "other_unknown": float(other_unknown.mean()) if len(other_labels) else None,
        "other_per_class": {lab: {"n": n, "unknown": answered[lab] / n}
                            for lab, n in sorted(counts.items())},
    }
