"""Classification metrics from labels and probabilities: top-k, per-class P/R/F1, confusion.

Pure numpy, shared by training (validation metrics in the model file), ``pictor eval`` and the
benchmark, so every number is computed the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pictor.core.files import write_atomic

log = logging.getLogger(__name__)


def top_k_accuracy(y: np.ndarray, probs: np.ndarray, k: int) -> float | None:
    """Share of rows whose true class is among the ``k`` most probable (of equal ones, the first,
    as ``argmax`` and the confusion matrix count); None without rows (no accuracy was measured:
    0.0 would read as every answer wrong)."""
    if len(y) == 0:
        return None
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = images of true class ``i`` predicted as ``j``."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def classification_report(
    y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix."""
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(1) if len(y) else np.zeros(0, dtype=np.int64)
    m = confusion_matrix(y, pred, len(class_names))
    tp = np.diag(m).astype(np.float64)
    predicted = m.sum(0).astype(np.float64)
    actual = m.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(class_names)
    }
    present = (actual > 0) | (predicted > 0)  # as scikit-learn: a class only predicted counts (F1 0)
    return {
        "n": int(len(y)),
        "top1": top_k_accuracy(y, probs, 1),
        "top5": top_k_accuracy(y, probs, 5) if len(class_names) > 5 else None,  # else always 1
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion": m.tolist(),
    }


def top5_text(report: dict[str, Any]) -> str:
    """"top-5: 0.9876   ", or nothing when it is not measured (at most 5 classes: always 1)."""
    return f"top-5: {report['top5']:.4f}   " if report["top5"] is not None else ""


def format_report(report: dict[str, Any]) -> str:
    """A table for people: overall accuracy, then one row per class."""
    open_set = ["", *format_open_set(report["open_set"])] if "open_set" in report else []
    if not report["n"]:
        return "\n".join(["images of the model's classes: none", *open_set])
    names = report["class_names"]
    width = max([len("class"), *(_columns(n) for n in names)])
    lines = [
        f"images: {report['n']}   top-1: {report['top1']:.4f}   {top5_text(report)}"
        f"macro F1: {report['macro_f1']:.4f}",
        "",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    for name in names:
        r = report["per_class"][name]
        lines.append(
            f"{name}{' ' * (width - _columns(name))}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  "
            f"{r['support']:7d}"
        )
    absent = [i for i, n in enumerate(names) if not report["per_class"][n]["support"]]
    answered = [i for i in absent if any(row[i] for row in report["confusion"])]
    if answered:
        lines.append(f"({', '.join(names[i] for i in answered)}: no images here, but answered: counted in "
                     "macro F1 with F1 0, as scikit-learn counts a class only predicted)")
    if left := [names[i] for i in absent if i not in answered]:
        lines.append(f"({', '.join(left)}: no images here and never answered: left out of macro F1)")
    return "\n".join(lines + open_set)


def _columns(text: str) -> int:
    """How many terminal columns ``text`` takes: CJK and emoji two each, accents none."""
    from wcwidth import wcswidth

    columns = wcswidth(text)
    return columns if columns >= 0 else len(text)  # (-1: a control character, in an older model's names)


def format_open_set(o: dict[str, Any]) -> list[str]:
    """Lines for people on how often Classify answers "unknown" (``evaluate``'s ``open_set``)."""
    lines = [f"open set (neighbours: {o['neighbours']})"]
    if o["known_n"]:
        lines.append(f"  images of the model's classes answered unknown: {o['known_unknown']:.1%} of {o['known_n']}; "
                     f"top-1 counting those as wrong: {o['top1_served']:.4f}")
    if o["other_n"]:
        per_class = ", ".join(f"{lab} {r['unknown']:.0%} of {r['n']}"
                              for lab, r in o["other_per_class"].items())
        lines.append(f"  images of other classes answered unknown: {o['other_unknown']:.1%} "
                     f"({per_class})")
    return lines


def plot_confusion(report: dict[str, Any], path: str) -> None:
    """Write the confusion matrix as a PNG: row-normalised colours, raw counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    m = np.asarray(report["confusion"], dtype=np.float64)
    names = report["class_names"]
    n = len(names)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    size = min(max(4.0, 0.6 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    labels = _tick_labels(names)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix\ntop-1 {report['top1']:.3f}, {report['n']} images" if report["n"]
                 else "Confusion matrix\nno images of the model's classes")
    if n <= 30:  # counts stay legible up to about 30 classes
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                            color=color, fontsize=8)
    fig.tight_layout()
    try:  # whole or not at all, as every file Pictor writes; to ``path`` as named: no suffix added
        write_atomic(Path(path), lambda f: fig.savefig(f, dpi=120, format="png"), durable=False)
    finally:
        plt.close(fig)


_TICK_CHARS = 24  # longer names squeezed the matrix into a corner


def _tick_labels(names: Sequence[str]) -> list[str]:
    """Class names as the plot can show them: long ones shortened, and those holding characters
    its font lacks (CJK and emoji in DejaVu Sans: empty boxes, and a warning per character) as
    their row number, said in one log line."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    drawable = FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap()
    labels, numbered = [], []
    for row, name in enumerate(names, 1):
        if all(ord(ch) in drawable for ch in name):
            labels.append(name if len(name) <= _TICK_CHARS else name[: _TICK_CHARS - 1] + "\u2026")
        else:
            labels.append(f"#{row}")
            numbered.append(f"#{row} {name}")
    if numbered:
        log.warning("the plot's font cannot draw %d class name(s), so they are numbered by row: %s",
                    len(numbered), ", ".join(numbered))
    return labels
