"""Labelled image sets for training and evaluation: discovery, manifests, stratified splits.

DATA is either an image-folder tree (``DATA/<class>/**/<image>``) or a manifest: a CSV with a
header holding ``path`` and ``label`` columns, or JSONL with one ``{"path": ..., "label": ...}``
object per line. Relative manifest paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pictor.errors import InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl"})


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    path: Path
    label: str


def load_samples(data: str | Path) -> list[Sample]:
    """Labelled images of ``data`` (folder tree or CSV/JSONL manifest), sorted by path."""
    root = Path(data)
    if not root.exists():
        raise NotFoundError(f"data {root} does not exist")
    if root.is_dir():
        samples = _from_folders(root)
    elif root.suffix.lower() in MANIFEST_SUFFIXES:
        samples = _from_manifest(root)
    else:
        raise InvalidRequestError(
            f"data {root} must be a folder with one sub-folder per class, or a .csv/.jsonl manifest"
        )
    if not samples:
        raise InvalidRequestError(f"data {root} holds no labelled images")
    return sorted(samples, key=lambda s: (s.label, str(s.path)))


def _from_folders(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(f, class_dir.name))
    if not samples and any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir()):
        raise InvalidRequestError(
            f"data {root} holds images but no class folders; put each class in its own "
            "sub-folder (DATA/<class>/<image>) or pass a CSV/JSONL manifest"
        )
    return samples


def _from_manifest(path: Path) -> list[Sample]:
    rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
    samples = []
    for i, (file, label) in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        if not file or not label:
            raise InvalidRequestError(f"{path} line {i}: both path and label are required")
        p = Path(file)
        samples.append(Sample(p if p.is_absolute() else path.parent / p, label))
    return samples


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if not {"path", "label"} <= fields:
            raise InvalidRequestError(
                f"manifest {path} needs a header with 'path' and 'label' columns, got "
                f"{sorted(fields) or 'no header'}"
            )
        return [((r["path"] or "").strip(), (r["label"] or "").strip()) for r in reader]


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path} line {i} is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InvalidRequestError(f"{path} line {i}: expected an object with path and label")
        rows.append((str(obj.get("path", "")).strip(), str(obj.get("label", "")).strip()))
    return rows


def class_names(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct labels."""
    return sorted({s.label for s in samples})


def check_class_sizes(samples: Sequence[Sample], min_per_class: int, what: str = "data") -> None:
    """Raise ``InvalidRequestError`` naming every class with fewer than ``min_per_class`` images."""
    counts = Counter(s.label for s in samples)
    small = {c: n for c, n in sorted(counts.items()) if n < min_per_class}
    if small:
        listed = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise InvalidRequestError(
            f"{what}: classes with fewer than {min_per_class} usable images: {listed}; "
            "add images, drop the class, or lower --min-per-class"
        )
    if len(counts) < 2:
        raise InvalidRequestError(
            f"{what}: a classifier needs at least 2 classes, got {len(counts)}"
        )


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split each class at random (seeded) into train and validation, keeping class shares.

    Every class with at least 2 images gives at least one image to each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidRequestError(f"validation fraction must be in (0, 1), got {val_fraction}")
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def cap_per_class(samples: Sequence[Sample], max_per_class: int, seed: int) -> list[Sample]:
    """At most ``max_per_class`` images per class, chosen at random (seeded); 0 = no cap."""
    if max_per_class <= 0:
        return list(samples)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    kept: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        kept.extend(sorted(items[:max_per_class], key=lambda s: str(s.path)))
    return kept


def data_fingerprint(content_hashes: Sequence[str], labels: Sequence[str]) -> str:
    """Order-independent digest of (image content, label) pairs: which data trained a model."""
    h = hashlib.sha256()
    for pair in sorted(zip(content_hashes, labels, strict=True)):
        h.update(f"{pair[0]}\t{pair[1]}\n".encode())
    return h.hexdigest()[:32]
