"""Training settings: one frozen object, built from ``pictor train`` flags and passed down."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pictor.config import DEFAULT_BACKBONE, DEFAULT_MAX_PIXELS, MAX_BATCH_SIZE
from pictor.errors import InvalidRequestError

MODES = ("linear", "finetune")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what ``train`` does; stored in the model file as given."""

    mode: str = "linear"
    backbone: str = DEFAULT_BACKBONE
    weights: str = ""  # "" = the backbone's default weights (see pictor.core.backbones)
    device: str = "auto"
    precision: str = "auto"  # of embedding and fine-tuning alike: "auto" = bf16 where fast, but
    # fp32 for fine-tuning on a CPU (see train.build_embedder)
    pooling: str = "avg"  # as `pictor index` pools (PICTOR_POOLING / `pooling =`), so both agree
    val_fraction: float = 0.2
    seed: int = 0
    min_per_class: int = 5  # usable images a class needs in the training split
    max_per_class: int = 0  # cap per class before splitting (0 = all), to bound a run
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as unreadable
    cache_dir: str = ""  # "" = default (PICTOR_CACHE_DIR or ~/.cache/pictor); "none" = off
    progress: bool = True
    # linear
    # Log-spaced; 0.1 added because the full CIFAR-10 probe picked 0.03, the old grid's edge.
    weight_decays: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    flip_views: bool = True  # linear heads also fit on mirrored training images (cached too)
    balance: bool = True  # class weights inversely proportional to class frequency
    # finetune
    epochs: int = 8
    unfreeze: int = 3  # last N stages of the backbone are trained
    lr: float = 1e-3  # head learning rate
    backbone_lr: float = 4e-4  # lower: the pretrained features need only a nudge
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 0.5
    patience: int = 3  # epochs without validation improvement before stopping
    # Mixup / CutMix Beta(alpha, alpha) on training batches (timm ``Mixup``; both > 0: one or
    # the other per batch, at random); 0 = off. Off by default: in 8 epochs they slow the
    # adaptation (CIFAR-10 subset 0.838 with 0.2 / 1.0 vs 0.862 without; flowers 0.932 vs
    # 0.928, one image), see docs/benchmarks.md.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Crop size while training; 0 = 7/8 of the input size, rounded to 32 (192 for 224): random
    # resized crops zoom in, so a smaller training size matches the objects' apparent size at
    # test time (Touvron et al., "FixRes") and costs a third less compute.
    train_size: int = 0
    # open set
    open_set: bool = True
    max_known_rejected: float = 0.05  # share of known validation images allowed to be "unknown"

    def __post_init__(self) -> None:
        """Refuse settings that cannot train, before any image is read (flag names, as the
        CLI spells them: that is where they come from)."""
        if self.mode not in MODES:
            raise InvalidRequestError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        checks = [
            ("--epochs", self.epochs, self.epochs >= 1, "at least 1"),
            ("--unfreeze", self.unfreeze, self.unfreeze >= 0, "0 or more"),
            ("--batch-size", self.batch_size, 1 <= self.batch_size <= MAX_BATCH_SIZE,
             f"between 1 and {MAX_BATCH_SIZE}"),
            ("--max-pixels", self.max_pixels, self.max_pixels >= 1, "at least 1"),
            ("--min-per-class", self.min_per_class, self.min_per_class >= 2, "at least 2"),
            ("--max-per-class", self.max_per_class, self.max_per_class >= 0, "0 (all) or more"),
            ("--val-fraction", self.val_fraction, 0 < self.val_fraction < 1, "above 0 and below 1"),
            ("--patience", self.patience, self.patience >= 1, "at least 1"),
            ("--lr", self.lr, self.lr > 0, "above 0"),
            ("--backbone-lr", self.backbone_lr, self.backbone_lr > 0, "above 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "0 or more"),
            ("--label-smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1,
             "at least 0 and below 1"),
            ("warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, "0 or more"),
            ("--mixup", self.mixup, self.mixup >= 0, "0 (off) or more"),
            ("--cutmix", self.cutmix, self.cutmix >= 0, "0 (off) or more"),
            ("--train-size", self.train_size, self.train_size == 0 or 32 <= self.train_size <= 1024,
             "0 (7/8 of the input size) or 32 to 1024"),
            ("--seed", self.seed, 0 <= self.seed < 2**32, "between 0 and 4294967295 (numpy's range)"),
            ("--max-known-rejected", self.max_known_rejected, 0 <= self.max_known_rejected < 1,
             "at least 0 and below 1"),
        ]
        for flag, value, ok, wanted in checks:
            if not ok or (isinstance(value, float) and not math.isfinite(value)):  # (inf passes the comparisons)
                shown = f"{value:g}" if isinstance(value, float) else f"{value}"  # (a huge int overflows :g)
                raise InvalidRequestError(f"{flag} must be {wanted}, got {shown}")
        if not self.weight_decays:
            raise InvalidRequestError("--weight-decays must name at least one value")
        for decay in self.weight_decays:
            if not (math.isfinite(decay) and decay >= 0):
                raise InvalidRequestError(f"--weight-decays must be 0 or more, got {decay:g}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_decays"] = list(self.weight_decays)
        return d
