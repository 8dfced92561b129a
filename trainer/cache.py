"""Embeddings of labelled images, cached on disk by image content and embedding space.

A second training run with other hyper-parameters (or ``pictor eval`` of a linear head on the
same images) finds its embeddings here instead of running the backbone again. The key is the
SHA-256 of the image file's bytes plus the ``ModelSpec`` (backbone, weights, fine-tune
fingerprint, preprocessing), the compute precision and the view (plain or mirrored), so
renaming or relabelling an image still hits, and changing the model never returns stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from pictor.config import DEFAULT_MAX_PIXELS
from pictor.core.decode import DECODE_VERSION
from pictor.core.files import content_hash, write_atomic
from pictor.core.spec import ModelSpec
from pictor.errors import InvalidImageError, NotFoundError
from pictor.image_files import path_text
from pictor.trainer.data import Sample

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pictor.core.embedder import Embedder

log = logging.getLogger(__name__)

_UNWRITABLE: set[Path] = set()  # cache folders a warning said could not be written
VIEWS = ("plain", "hflip")  # hflip: the mirrored image, a free augmentation for linear heads


def spec_key(spec: ModelSpec, view: str, precision: str) -> str:
    """Folder name of one embedding space, precision and view."""
    # "decode": entries from a Pictor that decoded some files otherwise (large JPEGs in full,
    # MPO photos in full) are other vectors of the same content. The precision: bf16 vectors
    # differ from fp32 ones (cosine 0.990-0.999), and a model file serves at the precision its
    # head was fitted at.
    blob = json.dumps({"spec": spec.to_dict(), "view": view, "precision": precision, "decode": DECODE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class EmbeddingCache:
    """One ``.npy`` file per (image content, embedding space, view); counts hits, and misses
    as the vectors computed and put here (an image found unreadable after its lookup is none)."""

    def __init__(self, root: str | Path, spec: ModelSpec, view: str = "plain", precision: str = "fp32") -> None:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
        self.root = Path(root)
        self.dir = self.root / "embeddings" / spec_key(spec, view, precision)
        self.spec, self.view = spec, view
        self.hits = 0
        self.misses = 0
        self.writable = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            about = self.dir / "spec.json"
            if not about.exists():  # for people browsing the cache
                about.write_text(json.dumps({"spec": spec.to_dict(), "view": view, "precision": precision}, indent=2))
        except OSError as e:
            self._stop_writing(e)

    def _stop_writing(self, error: OSError) -> None:
        # A cache only saves time: an unwritable folder or a full disk costs the next run its
        # embeddings again, not this run. Said once per cache folder (a run opens one per view
        # and split).
        self.writable = False
        if self.root not in _UNWRITABLE:
            _UNWRITABLE.add(self.root)
            log.warning("cannot write the embedding cache in %s (%s); going on without storing embeddings",
                        self.root, error.strerror or error)

    def _path(self, content_hash: str) -> Path:
        return self.dir / content_hash[:2] / f"{content_hash}.npy"

    def get(self, content_hash: str) -> np.ndarray | None:
        p = self._path(content_hash)
        try:
            vec = np.load(p)
        except (OSError, ValueError, EOFError):  # EOFError: an empty file (a crash before its write)
            return None
        if vec.shape != (self.spec.dim,):  # a damaged entry is a miss, and gets rewritten
            return None
        self.hits += 1
        return vec

    def put(self, content_hash: str, vector: np.ndarray) -> None:
        self.misses += 1
        if not self.writable:
            return
        p = self._path(content_hash)
        try:
            p.parent.mkdir(exist_ok=True)
            # atomic: concurrent runs never read half a vector
            write_atomic(p, lambda f: np.save(f, np.asarray(vector, dtype=np.float32)), durable=False)
        except OSError as e:
            self._stop_writing(e)


@dataclass
class EmbeddedSet:
    """Embeddings of the usable images of a sample list, in sample order."""

    embeddings: np.ndarray  # [N, dim] float32, or [V, N, dim] with several views
    samples: list[Sample]
    content_hashes: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samples]


def skipped_rows(skipped: Sequence[tuple[Path, str]]) -> list[dict[str, str]]:
    """Skipped images as the JSON of `pictor train` and `pictor eval` lists them."""
    return [{"path": path_text(p), "error": path_text(why)} for p, why in skipped]


def embed_samples(
    samples: Sequence[Sample],
    embedder: Embedder,
    *,
    cache_root: str | Path | None,
    views: Sequence[str] = ("plain",),
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> tuple[EmbeddedSet, dict[str, int]]:
    """Embed ``samples`` (cached when ``cache_root`` is set), skipping unreadable images.

    Returns the set and cache statistics ``{"hits": .., "misses": ..}`` (image-view pairs).
    ``progress(n)`` is called as images are done.
    """
    from pictor.core.decode import check_pixels, decode_image
    from pictor.core.embedder import degenerate, degenerate_why
    from pictor.image_files import read_image_file

    caches = [EmbeddingCache(cache_root, embedder.spec, v, embedder.precision) if cache_root else None
              for v in views]
    kept: list[Sample] = []
    hashes: list[str] = []
    skipped: list[tuple[Path, str]] = []
    rows: list[list[np.ndarray | None]] = []  # per kept sample, per view
    # (row index, per view: the preprocessed image, None where cached): tensors of the model's
    # input size wait for the backbone, never the decoded images (a batch of large PNGs is GBs)
    pending: list[tuple[int, list[torch.Tensor | None]]] = []
    failed_rows: set[int] = set()

    def flush() -> None:
        for vi in range(len(views)):
            todo = [(row, t) for row, tensors in pending if (t := tensors[vi]) is not None]
            if not todo:
                continue
            vecs = embedder.forward_preprocessed(t for _, t in todo).embeddings
            bad = degenerate(vecs)
            for (row, _), vec, is_bad in zip(todo, vecs, bad, strict=True):
                if is_bad:  # neither kept nor cached: one image, not a head trained on NaN
                    failed_rows.add(row)
                    continue
                rows[row][vi] = vec
                cache = caches[vi]
                if cache is not None:
                    cache.put(hashes[row], vec)
        if progress and pending:
            progress(len(pending))
        pending.clear()

    for s in samples:
        try:  # as the indexer reads: a FIFO named like an image is refused, not read forever
            data = read_image_file(s.path)
        except (InvalidImageError, NotFoundError) as e:
            # The list pairs each path with why; the error's own text begins with the path.
            skipped.append((s.path, str(e).removeprefix(f"{s.path}: ")))
            continue
        try:  # first: an image cached under another cap is no hit under this one
            check_pixels(data, max_pixels=max_pixels, draft_size=embedder.draft_size)
        except InvalidImageError as e:
            skipped.append((s.path, str(e)))
            continue
        h = content_hash(data)
        cached = [c.get(h) if c is not None else None for c in caches]
        if all(v is not None for v in cached):
            kept.append(s)
            hashes.append(h)
            rows.append(cached)
            if progress:
                progress(1)
            continue
        try:
            img = decode_image(data, max_pixels=max_pixels, draft_size=embedder.draft_size)  # as served
        except InvalidImageError as e:
            skipped.append((s.path, str(e)))
            continue
        kept.append(s)
        hashes.append(h)
        rows.append(cached)
        pending.append((len(rows) - 1, [None if vec is not None else embedder.preprocess(_view(img, view))
                                        for vec, view in zip(cached, views, strict=True)]))
        if len(pending) >= batch_size:
            flush()
    flush()
    if failed_rows:
        why = degenerate_why(embedder.precision)
        skipped += [(kept[r].path, why) for r in sorted(failed_rows)]
        good = [r for r in range(len(rows)) if r not in failed_rows]
        kept, hashes, rows = [kept[r] for r in good], [hashes[r] for r in good], [rows[r] for r in good]
    for path, why in skipped:
        log.warning("skipped %s: %s", path, why)
    stacked = np.empty((len(views), len(rows), embedder.spec.dim), np.float32)  # filled in place: one copy
    for vi in range(len(views)):
        if rows:
            stacked[vi] = [cast(np.ndarray, r[vi]) for r in rows]
    stats = {
        "hits": sum(c.hits for c in caches if c is not None),
        "misses": sum(c.misses for c in caches if c is not None),
    }
    embeddings = stacked[0] if len(views) == 1 else stacked
    return EmbeddedSet(embeddings, kept, hashes, skipped), stats


def _view(img: Image.Image, view: str) -> Image.Image:
    if view == "hflip":
        from PIL import Image as PILImage

        return img.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    return img
