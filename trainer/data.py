"""Labelled image sets for training and evaluation: what is training-specific on top of
``pictor.core.gallery`` (which lists the images): labels required, stratified splits, class checks.

DATA is either an image-folder tree (``DATA/<class>/**/<image>``) or a manifest: a CSV with a
header holding ``path`` and ``label`` columns, or JSONL with one ``{"path": ..., "label": ...}``
object per line. Relative manifest paths are relative to the manifest's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pictor.core.gallery import classless_folders, image_suffixes_text, read_gallery
from pictor.errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    path: Path
    label: str


def load_samples(data: str | Path) -> list[Sample]:
    """Labelled images of ``data`` (folder tree or CSV/JSONL manifest), sorted by label and path.

    Images directly in a folder's root have no class: they are left out, with a warning.
    """
    entries = list(read_gallery(data, require_label=True))
    samples = [Sample(e.path, e.label) for e in entries if e.label]
    loose = len(entries) - len(samples)
    if loose and not samples:
        raise InvalidRequestError(
            f"data {data} holds images but no class folders; put each class in its own "
            "sub-folder (DATA/<class>/<image>) or pass a CSV/JSONL manifest"
        )
    if loose:
        log.warning("%d image(s) directly in %s are not in a class folder and are left out", loose, data)
    if not samples:
        raise InvalidRequestError(f"data {data} holds no labelled images (looked for {image_suffixes_text()})")
    if empty := classless_folders(data, entries):
        if unreadable := [f"{name} ({why})" for name in empty if (why := _unreadable(Path(data) / name))]:
            # A class lost to its permissions would leave the model a class short, unsaid.
            raise InvalidRequestError(f"class folders of {data} that cannot be read: {', '.join(unreadable)}; fix "
                                      f"their permissions, or move them out of {data}")
        log.warning("folders in %s with no images, so not classes: %s", data, ", ".join(empty))
    _refuse_repeats(samples)
    return sorted(samples, key=lambda s: (s.label, str(s.path)))


def _unreadable(folder: Path) -> str | None:
    """Why ``folder`` cannot be listed (its error), or None."""
    try:
        with os.scandir(folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def _refuse_repeats(samples: Sequence[Sample]) -> None:
    """One image listed twice would sit on both sides of the split (or under two labels)."""
    labels: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        labels[os.path.abspath(s.path)].append(s.label)  # also ./a.jpg and /data/a.jpg
    repeated = {p: ls for p, ls in labels.items() if len(ls) > 1}
    if repeated:
        path, ls = next(iter(repeated.items()))
        raise InvalidRequestError(
            f"{len(repeated)} image(s) are listed more than once, e.g. {path} (labels: "
            f"{', '.join(ls)}); list each image once"
        )


def class_names(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct labels."""
    return sorted({s.label for s in samples})


def spelling_hint(others: Iterable[str], classes: Iterable[str]) -> str:
    """A hint for names among ``others`` that are one of ``classes`` spelled otherwise: in other
    case ("Daisy" for "daisy": folders named by hand, or copied from a case-insensitive file
    system), or the same number written otherwise ("1.0" for "1": manifest labels stay as written)."""
    folded = {_folded(c): c for c in classes}
    twins = [(o, folded[_folded(o)]) for o in others if _folded(o) in folded]
    if not twins:
        return ""
    return ("; class names are compared as written, case and digits alike: rename "
            + ", ".join(f"{o!r} to {c!r}" for o, c in twins))


def _folded(name: str) -> str:
    """``name`` as ``spelling_hint`` compares it: a finite number by its value, else case-folded."""
    with contextlib.suppress(ValueError):
        if math.isfinite(number := float(name)):
            return repr(number)
    return name.casefold()


def check_class_sizes(samples: Sequence[Sample], min_per_class: int, what: str = "data",
                      kind: str = "usable", classes: Iterable[str] = (), split_from: Sequence[Sample] = (),
                      val_fraction: float = 0.0) -> None:
    """Raise ``InvalidRequestError`` naming every class (of ``samples``, and every one of
    ``classes``, which may have none left) with fewer than ``min_per_class`` images (``kind``:
    "listed" or "training" (listed, after a split) before the images are read, "usable" after).
    ``samples`` split off ``split_from`` at ``val_fraction``: the message says what a class needs."""
    counts = Counter(dict.fromkeys(classes, 0))  # (update keeps a count of 0; + would drop it)
    counts.update(s.label for s in samples)
    small = {c: n for c, n in sorted(counts.items()) if n < min_per_class}
    if small:
        of = Counter(s.label for s in split_from)
        listed = ", ".join(f"{c!r} ({n}{f' of {of[c]} listed' if of else ''})" for c, n in small.items())
        needs = (f" (a class needs {needed_for_split(min_per_class, val_fraction)} for --val-fraction "
                 f"{val_fraction:g} to leave {min_per_class} to train on)") if of else ""
        lower = ", or lower --min-per-class" if min_per_class > 2 else ""  # 2 is the least
        raise InvalidRequestError(
            f"{what}: classes with fewer than {min_per_class} {kind} images: {listed}; "
            f"add images{needs} or drop the class{lower}"
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
    train: list[Sample] = []
    val: list[Sample] = []
    for items in _shuffled_by_class(samples, seed):
        n_val = _validation_count(len(items), val_fraction)
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def _validation_count(n: int, val_fraction: float) -> int:
    """Images a class of ``n`` gives to validation: its share, at least one, never all."""
    return min(max(1, round(val_fraction * n)), n - 1)


def needed_for_split(train_images: int, val_fraction: float) -> int:
    """The fewest images a class needs to keep ``train_images`` for training after the split."""
    n = train_images + 1
    while n - _validation_count(n, val_fraction) < train_images:
        n += 1
    return n


def cap_per_class(samples: Sequence[Sample], max_per_class: int, seed: int) -> list[Sample]:
    """At most ``max_per_class`` images per class, chosen at random (seeded); 0 = no cap."""
    if max_per_class <= 0:
        return list(samples)
    kept: list[Sample] = []
    for items in _shuffled_by_class(samples, seed):
        kept.extend(sorted(items[:max_per_class], key=lambda s: str(s.path)))
    return kept


def _shuffled_by_class(samples: Sequence[Sample], seed: int) -> list[list[Sample]]:
    """Each class's samples in a seeded random order (from path order, so the order of the
    listing does not matter), classes in name order."""
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    shuffled = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        shuffled.append(items)
    return shuffled


def data_fingerprint(content_hashes: Sequence[str], labels: Sequence[str]) -> str:
    """Order-independent digest of (image content, label) pairs: which data trained a model."""
    h = hashlib.sha256()
    for pair in sorted(zip(content_hashes, labels, strict=True)):
        h.update(f"{pair[0]}\t{pair[1]}\n".encode())
    return h.hexdigest()[:32]
