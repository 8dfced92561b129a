"""``pictor eval``: a model file on labelled images -> accuracy, per-class scores, confusion.

The images go through the model's own backbone (fine-tuned weights included), so the numbers
are those Classify would give. Images of classes the model does not know are counted and left
out; unreadable images are skipped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pictor.core.head import TrainedModel
from pictor.errors import InvalidRequestError
from pictor.trainer import data as data_mod
from pictor.trainer.cache import default_cache_dir, embed_samples
from pictor.trainer.metrics import classification_report

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder

log = logging.getLogger(__name__)


def evaluate(
    model: TrainedModel,
    data: str | Path,
    *,
    embedder: Embedder | None = None,
    cache_dir: str | Path | None = "",
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Classification report of ``model`` on ``data`` (folder tree or manifest).

    ``cache_dir``: ``""`` = the default embedding cache, ``None`` = no cache. The report adds
    ``skipped`` (unreadable images) and ``ignored`` (images of unknown classes) to
    ``metrics.classification_report``'s keys.
    """
    from tqdm import tqdm

    samples = data_mod.load_samples(data)
    known = set(model.class_names)
    usable = [s for s in samples if s.label in known]
    ignored = len(samples) - len(usable)
    if ignored:
        others = sorted({s.label for s in samples} - known)
        log.warning("%d image(s) of classes the model does not know are ignored: %s", ignored,
                    ", ".join(others[:10]))
    if not usable:
        raise InvalidRequestError(
            f"no image in {data} belongs to a class of the model ({', '.join(model.class_names)})"
        )
    embedder = embedder or model.create_embedder(device=device)
    model.check_index(embedder.spec)  # the embedder must feed this head's embedding space
    root = None if cache_dir is None else (Path(cache_dir) if cache_dir else default_cache_dir())
    with tqdm(total=len(usable), desc="embed", unit="img", disable=not progress,
              leave=False) as bar:
        emb, _ = embed_samples(usable, embedder, cache_root=root, batch_size=batch_size,
                               progress=bar.update)
    if not emb.samples:
        raise InvalidRequestError(f"none of the {len(usable)} images in {data} could be read")
    index = {n: i for i, n in enumerate(model.class_names)}
    y = np.array([index[lab] for lab in emb.labels], dtype=np.int64)
    report = classification_report(y, model.predict_proba(emb.embeddings), model.class_names)
    report["skipped"] = [{"path": str(p), "why": why} for p, why in emb.skipped]
    report["ignored"] = ignored
    return report
