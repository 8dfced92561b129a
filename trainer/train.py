"""``pictor train``: labelled images -> a self-describing model file (``pictor.core.head``).

Both modes embed the images once through the frozen backbone (cached on disk) and fit a
logistic-regression head with the weight decay that does best on validation. ``linear`` stops
there; ``finetune`` starts from that head and trains the last stages of the backbone with it
(``pictor.trainer.finetune``). Then the head's temperature and the open-set thresholds are
calibrated on the validation split, and everything is written to the model file.

Example::

    from pictor.trainer.config import TrainConfig
    from pictor.trainer.train import train
    result = train(TrainConfig(mode="linear"), "flowers/", out="flowers.pt")
    result.model.metrics["top1"]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.core.head import TrainedModel, apply_backbone_state
from pictor.errors import InvalidRequestError
from pictor.trainer import data as data_mod
from pictor.trainer.cache import EmbeddedSet, default_cache_dir, embed_samples
from pictor.trainer.config import TrainConfig
from pictor.trainer.linear import class_weights, fit_temperature, select_head
from pictor.trainer.metrics import classification_report
from pictor.trainer.openset import calibrate_open_set

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: TrainedModel
    report: dict[str, Any]  # validation classification report (see metrics.classification_report)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images
    cache: dict[str, int] = field(default_factory=dict)  # embedding cache hits / misses
    seconds: float = 0.0


@dataclass(frozen=True)
class Splits:
    train: list[data_mod.Sample]
    val: list[data_mod.Sample]


def make_splits(config: TrainConfig, data: str | Path, val_data: str | Path | None = None
                ) -> Splits:
    """Training and validation samples: a stratified, seeded split unless ``val_data`` is given."""
    samples = data_mod.cap_per_class(data_mod.load_samples(data), config.max_per_class,
                                     config.seed)
    if val_data is not None:
        return Splits(samples, data_mod.load_samples(val_data))
    data_mod.check_class_sizes(samples, config.min_per_class, what=str(data))
    train, val = data_mod.stratified_split(samples, config.val_fraction, config.seed)
    return Splits(train, val)


def resolve_cache_root(config: TrainConfig) -> Path | None:
    if config.cache_dir.lower() == "none":
        return None
    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def build_embedder(config: TrainConfig) -> Embedder:
    from pictor.core.embedder import create_embedder

    return create_embedder(config.backbone, weights=config.weights or None, device=config.device,
                           precision=config.precision,
                           batch_size=config.batch_size)


def embed_set(samples: list[data_mod.Sample], embedder: Embedder, config: TrainConfig,
              what: str, views: tuple[str, ...] = ("plain",)) -> tuple[EmbeddedSet, dict[str, int]]:
    """Embed with a progress bar; unreadable images are skipped, counted and logged."""
    from tqdm import tqdm

    with tqdm(total=len(samples), desc=f"embed {what}", unit="img",
              disable=not config.progress, leave=False) as bar:
        emb, stats = embed_samples(samples, embedder, cache_root=resolve_cache_root(config),
                                   views=views, batch_size=config.batch_size, progress=bar.update)
    if emb.skipped:
        log.warning("%s: skipped %d unreadable image(s) of %d", what, len(emb.skipped),
                    len(samples))
    return emb, stats


def train(
    config: TrainConfig,
    data: str | Path,
    *,
    val_data: str | Path | None = None,
    splits: Splits | None = None,
    out: str | Path | None = None,
    embedder: Embedder | None = None,
) -> TrainResult:
    """Train a head (and, in finetune mode, the last backbone stages) on labelled images.

    ``splits`` gives the training and validation samples directly (else they come from
    ``data`` and ``val_data``). ``embedder`` overrides the one ``config`` names (tests,
    benchmarks reusing a loaded one); in finetune mode its backbone is modified in place.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    splits = splits or make_splits(config, data, val_data)
    embedder = embedder or build_embedder(config)
    views = ("plain", "hflip") if config.mode == "linear" and config.flip_views else ("plain",)
    tr, stats_tr = embed_set(splits.train, embedder, config, "train", views)
    va, stats_va = embed_set(splits.val, embedder, config, "val")
    cache = {k: stats_tr[k] + stats_va[k] for k in stats_tr}
    skipped = tr.skipped + va.skipped
    data_mod.check_class_sizes(tr.samples, config.min_per_class, what=f"{data} (training split)")
    names = data_mod.class_names(tr.samples)
    y_tr = _encode(tr.labels, names)
    va_keep = np.array([lab in set(names) for lab in va.labels], dtype=bool)
    if not va_keep.all():
        log.warning("validation: %d image(s) of classes absent from training are ignored",
                    int((~va_keep).sum()))
    if not va_keep.any():
        raise InvalidRequestError("the validation set shares no class with the training set")
    x_va = va.embeddings[va_keep]
    y_va = _encode([lab for lab, k in zip(va.labels, va_keep, strict=True) if k], names)
    x_tr = tr.embeddings.reshape(-1, embedder.spec.dim)  # views stacked as extra samples
    fit = select_head(x_tr, np.tile(y_tr, len(views)), x_va, y_va, len(names),
                      weight_decays=config.weight_decays, balance=config.balance,
                      seed=config.seed)
    head, extra = fit.head, {"weight_decay": fit.weight_decay, "sweep": fit.sweep}
    backbone_state: dict[str, torch.Tensor] = {}
    x_plain = tr.embeddings if len(views) == 1 else tr.embeddings[0]
    if config.mode == "finetune":
        from pictor.trainer.finetune import finetune

        va_samples = [s for s, k in zip(va.samples, va_keep, strict=True) if k]
        ft = finetune(embedder, head, (tr.samples, y_tr), (va_samples, y_va), config,
                      class_weights=class_weights(y_tr, len(names)) if config.balance else None)
        backbone_state = ft.changed_state
        apply_backbone_state(embedder, backbone_state)
        extra |= {"linear_probe_val_accuracy": fit.val_accuracy, "best_epoch": ft.best_epoch,
                  "epochs_run": ft.epochs_run, "history": ft.history}
        # Re-embed with the tuned backbone: these are the vectors the served head will see.
        tr, _ = embed_set(tr.samples, embedder, config, "train (tuned)")
        va2, _ = embed_set(va_samples, embedder, config, "val (tuned)")
        x_plain, x_va = tr.embeddings, va2.embeddings
    with torch.no_grad():
        val_logits = head(torch.as_tensor(x_va))
    temperature = fit_temperature(val_logits, y_va)
    probs = torch.softmax(val_logits / temperature, 1).numpy()
    report = classification_report(y_va, probs, names)
    thresholds = None
    if config.open_set:
        cal = calibrate_open_set(x_plain, y_tr, x_va, y_va, len(names), fit.weight_decay,
                                 max_known_rejected=config.max_known_rejected,
                                 balance=config.balance, seed=config.seed)
        thresholds = cal.thresholds
        extra |= {"open_set_pseudo_unknown_rejected": cal.pseudo_unknown_rejected,
                  "open_set_pseudo_known_rejected": cal.pseudo_known_rejected}
    metrics = {k: report[k] for k in ("n", "top1", "top5", "macro_f1")} | extra
    metrics |= {"train_images": len(tr.samples), "skipped_images": len(skipped),
                "temperature": temperature}
    model = TrainedModel(
        spec=embedder.spec,  # in finetune mode apply_backbone_state has set spec.finetune
        class_names=names,
        head=head,
        temperature=temperature,
        thresholds=thresholds,
        metrics=metrics | {"per_class": report["per_class"]},
        training=config.to_dict() | {"data": str(data), "val_data": str(val_data or "")},
        data_fingerprint=data_mod.data_fingerprint(tr.content_hashes, tr.labels),
        backbone_state=backbone_state,
    )
    if out is not None:
        model.save(out)
    seconds = time.perf_counter() - start
    log.info("trained %s head on %d images (%d classes) in %.1fs: val top-1 %.4f",
             config.mode, len(tr.samples), len(names), seconds, report["top1"])
    return TrainResult(model, report, skipped, cache, seconds)


def _encode(labels: list[str], names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[lab] for lab in labels], dtype=np.int64)
