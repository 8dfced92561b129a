"""Fitting a head on fixed embeddings: multinomial logistic regression with L2 weight decay.

Full-batch L-BFGS on standardised features: deterministic, a few seconds for thousands of
images, and no learning rate to tune. Weight decay is chosen on the validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pictor.core.head import ClassifierHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearFit:
    head: ClassifierHead
    weight_decay: float
    val_accuracy: float
    val_loss: float
    sweep: list[dict[str, float]]  # every candidate's weight decay, val accuracy, val loss


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the samples) so rare classes count as much."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    weight_decay: float,
    *,
    weights: torch.Tensor | None = None,
    max_iter: int = 300,
) -> ClassifierHead:
    """One logistic-regression head on ``x [N, dim]`` (float32) and integer labels ``y``.
    Deterministic: a zero start and L-BFGS, so no seed."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    head = ClassifierHead(xt.shape[1], num_classes)
    head.set_standardization(xt)
    linear = head.body
    assert isinstance(linear, torch.nn.Linear)
    torch.nn.init.zeros_(linear.weight)  # convex problem: a zero start is as good as any
    torch.nn.init.zeros_(linear.bias)
    z = ((xt - head.mean) / head.scale).detach()
    opt = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), yt, weight=weights)
        loss = loss + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.eval()
    return head


def evaluate_head(head: ClassifierHead, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``head`` on ``x``, ``y``."""
    with torch.no_grad():
        logits = head(torch.as_tensor(x, dtype=torch.float32))
        yt = torch.as_tensor(y, dtype=torch.long)
        acc = float((logits.argmax(1) == yt).float().mean())
        loss = float(F.cross_entropy(logits, yt))
    return acc, loss


def select_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    *,
    weight_decays: Sequence[float],
    balance: bool = True,
) -> LinearFit:
    """Fit one head per weight decay; keep the best on validation (accuracy, then loss).

    Among heads that classify every validation image right, the most regularised: the loss
    then only says that weaker decay sharpens further (as with ``fit_temperature``), and the
    weakest gave answers of 1.000 to images of classes never seen."""
    if not weight_decays:  # (TrainConfig refuses it too; this is also a library call)
        raise ValueError("weight_decays must not be empty")
    weights = class_weights(y_train, num_classes) if balance else None
    fits: list[tuple[float, float, float, ClassifierHead]] = []  # (accuracy, loss, decay, head)
    for wd in weight_decays:
        head = fit_head(x_train, y_train, num_classes, wd, weights=weights)
        acc, loss = evaluate_head(head, x_val, y_val)
        fits.append((acc, loss, wd, head))
        log.info("weight decay %g: val accuracy %.4f, loss %.4f", wd, acc, loss)
    perfect = [f for f in fits if f[0] == 1.0]
    acc, loss, wd, head = (max(perfect, key=lambda f: f[2]) if perfect
                           else max(fits, key=lambda f: (f[0], -f[1])))
    if len(fits) > 1:
        log.info("weight decay %g kept: %s", wd, "the strongest of those with every validation image right"
                 if len(perfect) > 1 else "the best validation accuracy, then loss")
    sweep = [{"weight_decay": f[2], "val_accuracy": f[0], "val_loss": f[1]} for f in fits]
    return LinearFit(head, wd, acc, loss, sweep)


def fit_temperature(logits: torch.Tensor, y: np.ndarray) -> float:
    """Temperature that minimises validation NLL (calibrated probabilities for thresholds).

    1 when every validation image is classified right: the loss then falls for ever as the
    temperature does (it took the grid's end, 0.05: 20x sharper logits, and 1.000 for any
    image, of a class never seen too), and nothing measured says how far to sharpen."""
    yt = torch.as_tensor(y, dtype=torch.long)
    if len(yt) == 0 or bool((logits.argmax(1) == yt).all()):
        return 1.0
    grid = torch.exp(torch.linspace(np.log(0.05), np.log(20.0), 121))
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(logits / t, yt) for t in grid])
    return float(grid[int(losses.argmin())])
