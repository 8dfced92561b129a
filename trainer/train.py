"""``pictor train``: labelled images -> a self-describing model file (``pictor.core.head``).

Both modes embed the images once through the frozen backbone (cached on disk) and fit a
logistic-regression head with the weight decay that does best on validation. ``linear`` stops
there; ``finetune`` starts from that head and trains the last stages of the backbone with it
(``pictor.trainer.finetune``), then serves the better on validation of that head and a probe
refitted on the tuned features, or the first probe and backbone if tuning lost accuracy.
Then the head's temperature and the open-set rule (class Gaussians and thresholds) are
calibrated on the validation split, and everything is written to the model file.

Example::

    from pictor.trainer.config import TrainConfig
    from pictor.trainer.train import train
    result = train(TrainConfig(mode="linear"), "flowers/", out="flowers.pt")
    result.model.metrics["top1"]
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.config import cache_root
from pictor.core.embedder import apply_backbone_state
from pictor.core.gallery import relative_paths_hint
from pictor.core.head import ClassifierHead, TrainedModel, content_ids
from pictor.errors import InvalidImageError, InvalidRequestError, NotFoundError
from pictor.trainer import data as data_mod
from pictor.trainer.cache import EmbeddedSet, embed_samples
from pictor.trainer.config import TrainConfig
from pictor.trainer.linear import (
    LinearFit,
    class_weights,
    evaluate_head,
    fit_temperature,
    select_head,
)
from pictor.trainer.metrics import classification_report
from pictor.trainer.openset import calibrate_open_set

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder

log = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 50  # validation images below which open-set thresholds are shaky


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
    _check_cap(config, split=val_data is None)
    samples = data_mod.cap_per_class(data_mod.load_samples(data), config.max_per_class,
                                     config.seed)
    how = [f"--max-per-class {config.max_per_class}"] if config.max_per_class else []
    if val_data is not None:
        try:
            val = data_mod.load_samples(val_data)
        except (InvalidRequestError, NotFoundError) as e:  # they name the folder only: which one was it?
            raise type(e)(f"the validation set (--val): {e}") from None
        train = samples
        if not set(data_mod.class_names(train)) & set(data_mod.class_names(val)):
            raise InvalidRequestError(
                f"the validation set {val_data} ({_classes_text(val)}) shares no class with the training "
                f"set {data} ({_classes_text(train)}); its folder or label names must be the classes'")
    else:
        train, val = data_mod.stratified_split(samples, config.val_fraction, config.seed)
        how.append(f"--val-fraction {config.val_fraction:g} for validation")
    what = f"{data} (training images after {' and '.join(how)})" if how else str(data)
    # Before any image is embedded; unreadable images are counted again after.
    data_mod.check_class_sizes(train, config.min_per_class, what=what, kind="training" if how else "listed",
                               split_from=samples if val_data is None else (), val_fraction=config.val_fraction)
    return Splits(train, val)


def _check_cap(config: TrainConfig, split: bool) -> None:
    """A --max-per-class too low for --min-per-class starves every class it reaches, however many
    images it has: said as such, not as a list of classes short of images."""
    need = (data_mod.needed_for_split(config.min_per_class, config.val_fraction) if split
            else config.min_per_class)
    if 0 < config.max_per_class < need:
        after = f" after --val-fraction {config.val_fraction:g} (that takes {need} images)" if split else ""
        lower = ", or lower --min-per-class" if config.min_per_class > 2 else ""  # 2 is the least
        raise InvalidRequestError(
            f"--max-per-class {config.max_per_class} leaves every class it caps fewer than --min-per-class "
            f"{config.min_per_class} training images{after}; give --max-per-class {need} or more{lower}")


def _classes_text(samples: Sequence[data_mod.Sample], most: int = 8) -> str:
    names = data_mod.class_names(samples)
    more = f", ... ({len(names)} classes)" if len(names) > most else ""
    return "classes " + ", ".join(map(repr, names[:most])) + more


def build_embedder(config: TrainConfig) -> Embedder:
    from pictor.core.embedder import create_embedder, resolve_device

    precision = config.precision
    if precision == "auto" and config.mode == "finetune" and resolve_device(config.device).type == "cpu":
        # bf16 autocast is not faithful for training on a CPU: on the flowers split it fine-tuned
        # to 0.904 where fp32 reached 0.920 (docs/benchmarks.md). Inference in bf16 is.
        precision = "fp32"
    return create_embedder(config.backbone, weights=config.weights or None, device=config.device,
                           precision=precision, pooling=config.pooling,
                           batch_size=config.batch_size)


def embed_set(samples: list[data_mod.Sample], embedder: Embedder, config: TrainConfig,
              what: str, views: tuple[str, ...] = ("plain",)) -> tuple[EmbeddedSet, dict[str, int]]:
    """Embed with a progress bar; unreadable images are skipped, counted and logged."""
    from tqdm import tqdm

    with tqdm(total=len(samples), desc=f"embed {what}", unit="img",
              disable=not config.progress, leave=False) as bar:
        emb, stats = embed_samples(samples, embedder, cache_root=cache_root(config.cache_dir),
                                   views=views, batch_size=config.batch_size,
                                   max_pixels=config.max_pixels, progress=bar.update)
    if emb.skipped:
        log.warning("%s: skipped %d image(s) of %d (unreadable, or over the pixel cap)", what, len(emb.skipped),
                    len(samples))
    return emb, stats


@dataclass
class _Fitted:
    """The state of a run between its steps: embeddings, labels and the chosen head."""

    names: list[str]
    x_train: np.ndarray  # [V, N, dim]: views of the training images
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_samples: list[data_mod.Sample]
    val_hashes: list[str]  # their content hashes
    fit: LinearFit
    head: ClassifierHead
    extra: dict[str, Any] = field(default_factory=dict)  # metrics of the steps run


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
    # A checkpoint path as the model file keeps it: absolute, so the file works from anywhere.
    if config.weights and (path := Path(config.weights).expanduser()).is_file():
        config = dataclasses.replace(config, weights=str(path.resolve()))
    splits = splits or make_splits(config, data, val_data)
    embedder = embedder or build_embedder(config)
    views = ("plain", "hflip") if config.flip_views else ("plain",)
    # Finetune mode starts from --mode linear's probe, and falls back to it when tuning loses.
    tr, stats_tr = embed_set(splits.train, embedder, config, "train", views)
    va, stats_va = embed_set(splits.val, embedder, config, "val")
    cache = {k: stats_tr[k] + stats_va[k] for k in stats_tr}
    skipped = tr.skipped + va.skipped
    state = _linear_probe(config, (data, val_data or data), splits, tr, va)
    backbone_state: dict[str, torch.Tensor] = {}
    if config.mode == "finetune":
        backbone_state, tuned_cache = _finetune(config, embedder, tr, state, views)
        cache = {k: cache[k] + tuned_cache[k] for k in cache}  # the tuned backbone embeds anew
    with torch.no_grad():
        val_logits = state.head(torch.as_tensor(state.x_val))
    temperature = fit_temperature(val_logits, state.y_val)
    probs = torch.softmax(val_logits.double() / temperature, 1).numpy()  # (see predict_proba)
    report = classification_report(state.y_val, probs, state.names)
    open_set = None
    if config.open_set:
        cal = calibrate_open_set(state.x_train, state.y_train, state.x_val, state.y_val,
                                 len(state.names), max_known_rejected=config.max_known_rejected)
        open_set = cal.open_set
        state.extra |= {"open_set_pseudo_unknown_rejected": cal.pseudo_unknown_rejected,
                        "open_set_pseudo_known_rejected": cal.pseudo_known_rejected}
        if report["n"] < MIN_CALIBRATION_IMAGES:
            log.warning("the open-set thresholds rest on %d validation images, so the share of known "
                        "images answered unknown may be far from the budget; use more %s, or check it "
                        "with `pictor eval MODEL HELDOUT/ --index INDEX`", report["n"],
                        "validation images" if val_data is not None else "images (or --val)")
    metrics = {k: report[k] for k in ("n", "top1", "top5", "macro_f1")} | state.extra
    metrics |= {"train_images": len(tr.samples), "skipped_images": len(skipped),
                "temperature": temperature, "per_class": report["per_class"]}
    model = TrainedModel(
        spec=embedder.spec,  # in finetune mode apply_backbone_state has set spec.finetune
        class_names=state.names,
        head=state.head,
        temperature=temperature,
        open_set=open_set,
        metrics=metrics,
        # The precision as resolved ("auto" differs by machine): serving keeps it (create_embedder).
        training=config.to_dict() | {"data": str(data), "val_data": str(val_data or ""),
                                     "precision": embedder.precision},
        data_fingerprint=data_mod.data_fingerprint(tr.content_hashes, tr.labels),
        training_images=content_ids(tr.content_hashes),
        validation_images=content_ids(state.val_hashes),
        backbone_state=backbone_state,
    )
    if out is not None:
        model.save(out)
    seconds = time.perf_counter() - start
    log.info("trained %s on %d images (%d classes) in %.1fs: val top-1 %.4f",
             head_description(config.mode, metrics), len(tr.samples), len(state.names), seconds, report["top1"])
    return TrainResult(model, report, skipped, cache, seconds)


def head_description(mode: str, metrics: dict[str, Any]) -> str:
    """What was trained, for people: a fine-tuning run may have kept its first linear probe."""
    if mode == "finetune" and metrics.get("head") == "linear probe":
        return "linear head (fine-tuning lowered validation top-1: the probe on the pretrained backbone is kept)"
    return f"{mode} head"


def _linear_probe(config: TrainConfig, sources: tuple[str | Path, str | Path], listed: Splits,
                  tr: EmbeddedSet, va: EmbeddedSet) -> _Fitted:
    """Check the classes (each of the ``listed`` training images' that lost its readable
    images too), encode labels, fit the head with the best weight decay. ``sources``: where
    the training and the validation images are listed."""
    for source, emb, images, what in ((sources[0], tr, listed.train, "training"),
                                      (sources[1], va, listed.val, "validation")):
        if not emb.samples:
            raise InvalidRequestError(f"{source}: none of the {len(images)} {what} images could be read "
                                      f"(each is named above){relative_paths_hint(source)}")
    data_mod.check_class_sizes(tr.samples, config.min_per_class, what=f"{sources[0]} (training split)",
                               classes=data_mod.class_names(listed.train))
    names = data_mod.class_names(tr.samples)
    _warn_of_label_conflicts(tr, va)
    known = set(names)
    keep = np.array([lab in known for lab in va.labels], dtype=bool)
    if not keep.any():  # (the listed sets shared a class: make_splits checks)
        raise InvalidRequestError(f"no readable validation image in {sources[1]} is of a class with readable "
                                  f"training images ({_classes_text(tr.samples)}); the readable ones are "
                                  f"{_classes_text(va.samples)}")
    if not keep.all():
        unknown = sorted({lab for lab, k in zip(va.labels, keep, strict=True) if not k})
        log.warning("validation: %d image(s) of classes absent from training are ignored (%s)%s",
                    int((~keep).sum()), ", ".join(map(repr, unknown)), data_mod.spelling_hint(unknown, names))
    keep &= _not_in_training(tr, va)
    if not keep.any():
        raise InvalidRequestError("every validation image of the trained classes is also a training image "
                                  "(same content); validate on other images (--val), or leave --val out "
                                  "to split off a share")
    absent = sorted(known - {lab for lab, k in zip(va.labels, keep, strict=True) if k})
    if absent:
        log.warning("validation has no images of %s: the open-set thresholds leave %s out, and an image "
                    "answered with %s adds an F1 of 0 to macro F1 (as scikit-learn counts a class only "
                    "predicted)", ", ".join(absent),
                    *(("it", "that class") if len(absent) == 1 else ("them", "one of those classes")))
    x_train = _as_views(tr.embeddings)
    y_train = _encode(tr.labels, names)
    val_samples = [s for s, k in zip(va.samples, keep, strict=True) if k]
    x_val, y_val = va.embeddings[keep], _encode([s.label for s in val_samples], names)
    fit = _select(config, x_train, y_train, x_val, y_val, len(names))
    val_hashes = [h for h, k in zip(va.content_hashes, keep, strict=True) if k]
    return _Fitted(names, x_train, y_train, x_val, y_val, val_samples, val_hashes, fit, fit.head,
                   {"weight_decay": fit.weight_decay, "sweep": fit.sweep})


def _warn_of_label_conflicts(*sets: EmbeddedSet) -> None:
    """The same image (by content) under two labels teaches the head both answers; one of them
    a validation image, it is left out as a copy of a training image, its other label unsaid."""
    paths: dict[str, dict[str, Path]] = {}  # content -> label -> the first path of it
    for embedded in sets:
        for sample, digest in zip(embedded.samples, embedded.content_hashes, strict=True):
            paths.setdefault(digest, {}).setdefault(sample.label, sample.path)
    if conflicts := [by_label for by_label in paths.values() if len(by_label) > 1]:
        log.warning("%d image(s) appear under more than one label (same content), e.g. %s", len(conflicts),
                    ", ".join(f"{path} as {label!r}" for label, path in sorted(conflicts[0].items())))


def _not_in_training(tr: EmbeddedSet, va: EmbeddedSet) -> np.ndarray:
    """Mask of validation images whose content is no training image's. Copies would measure
    memory, not accuracy, and set the open-set thresholds at a similarity of 1."""
    seen = set(tr.content_hashes)
    fresh = np.array([h not in seen for h in va.content_hashes], dtype=bool)
    if fresh.any() and not fresh.all():
        log.warning("validation: %d image(s) are copies of training images (same content), e.g. %s; "
                    "left out of validation", int((~fresh).sum()), va.samples[int(np.argmin(fresh))].path)
    return fresh


def _select(config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
            y_val: np.ndarray, num_classes: int) -> LinearFit:
    """Logistic-regression head on all views (stacked as extra samples)."""
    return select_head(x_train.reshape(-1, x_train.shape[-1]), np.tile(y_train, len(x_train)),
                       x_val, y_val, num_classes, weight_decays=config.weight_decays,
                       balance=config.balance)


def _finetune(config: TrainConfig, embedder: Embedder, tr: EmbeddedSet, state: _Fitted,
              views: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Tune the backbone from the probe's head, re-embed, keep the best head; in place.
    Returns the changed backbone tensors (none when the probe stays best) and the
    re-embedding's cache counts."""
    from pictor.trainer.finetune import finetune

    probe_head = copy.deepcopy(state.head)  # finetune trains state.head in place
    probe_fit, probe_x_train, probe_x_val = state.fit, state.x_train, state.x_val
    weights = class_weights(state.y_train, len(state.names)) if config.balance else None
    ft = finetune(embedder, state.head, (tr.samples, state.y_train),
                  (state.val_samples, state.y_val), config, class_weights=weights)
    apply_backbone_state(embedder, ft.changed_state)
    state.extra |= {"linear_probe_val_accuracy": state.fit.val_accuracy,
                    "best_epoch": ft.best_epoch, "epochs_run": ft.epochs_run,
                    "history": ft.history}
    # Re-embed with the tuned backbone: these are the vectors the served head will see.
    tuned, stats_tr = embed_set(tr.samples, embedder, config, "train (tuned)", views)
    tuned_val, stats_va = embed_set(state.val_samples, embedder, config, "val (tuned)")
    stats = {k: stats_tr[k] + stats_va[k] for k in stats_tr}
    if len(tuned.samples) != len(tr.samples) or len(tuned_val.samples) != len(state.y_val):
        raise InvalidImageError("images became unreadable during training; run it again")
    state.x_train = _as_views(tuned.embeddings)
    state.x_val = tuned_val.embeddings
    # A probe refitted on the tuned features often beats the head trained along with them
    # (no augmentation noise, weight decay chosen on validation): keep the better one.
    refit = _select(config, state.x_train, state.y_train, state.x_val, state.y_val,
                    len(state.names))
    joint_acc, joint_loss = evaluate_head(state.head, state.x_val, state.y_val)
    use_refit = (refit.val_accuracy, -refit.val_loss) > (joint_acc, -joint_loss)
    state.extra |= {"joint_head_val_accuracy": joint_acc,
                    "refit_head_val_accuracy": refit.val_accuracy}
    tuned_accuracy = refit.val_accuracy if use_refit else joint_acc
    if probe_fit.val_accuracy > tuned_accuracy:
        # Few images or epochs can leave the tuned backbone behind the pretrained one: then
        # the model is the probe (early stopping at epoch 0), and needs no index of its own.
        # (Accuracy alone decides: a head trained with label smoothing has a higher loss.)
        log.warning("fine-tuning lowered validation top-1 (the linear probe %.4f; on the tuned backbone's "
                    "embeddings, the head trained along %.4f, a probe refitted %.4f): the model keeps "
                    "the pretrained backbone and that probe (what --mode linear makes)",
                    probe_fit.val_accuracy, joint_acc, refit.val_accuracy)
        embedder.backbone.load_state_dict(ft.initial_state, strict=False)
        embedder.spec = dataclasses.replace(embedder.spec, finetune="")
        state.head, state.fit, state.x_train, state.x_val = probe_head, probe_fit, probe_x_train, probe_x_val
        state.extra["head"] = "linear probe"
        return {}, stats
    if use_refit:
        state.head, state.fit = refit.head, refit
        state.extra |= {"weight_decay": refit.weight_decay, "sweep": refit.sweep}
    else:  # trained along with the backbone, by AdamW at --weight-decay: the sweep was the first probe's
        state.extra |= {"weight_decay": config.weight_decay, "linear_probe_sweep": state.extra.pop("sweep")}
    state.extra["head"] = "refit" if use_refit else "joint"
    return ft.changed_state, stats


def _as_views(embeddings: np.ndarray) -> np.ndarray:
    """``[V, N, dim]``: a set embedded with one view comes as ``[N, dim]``."""
    return embeddings if embeddings.ndim == 3 else embeddings[None]


def _encode(labels: list[str], names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[lab] for lab in labels], dtype=np.int64)
