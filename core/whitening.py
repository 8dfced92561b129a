"""PCA-whitening of an index's vectors, and opening an index with it.

An index built with ``pictor index --pca-whiten DIM`` holds whitened vectors: its ``ModelSpec``
has the whitened ``dim`` and ``whitening="pca<dim>:<fingerprint>"``, and ``whitening.npz``
beside it holds the transform. Whoever opens such an index (``open_index``) gets the transform
and the embedder's own, unwhitened spec with the store: what an embedder or a head must make.
Pure numpy: no torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pictor.core._store_files import WHITENING_FILE
from pictor.core.files import write_atomic
from pictor.core.spec import ModelSpec
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from pictor.core.store import IndexStore



@dataclass(frozen=True)
class PCAWhitening:
    """PCA-whitening of embeddings, fitted on a gallery sample, then L2 re-normalised.

    A known gain for retrieval with CNN features: it decorrelates dimensions and down-weights
    the dominant, "bursty" ones. Fit once on a sample of gallery embeddings, ``save(dir)``
    it next to the index (``whitening.npz``; ``load(dir, spec)`` reads it), and apply the same
    transform to gallery and queries.
    """

    mean: np.ndarray  # [dim]
    projection: np.ndarray  # [dim, out_dim]: eigenvectors scaled by 1/sqrt(eigenvalue)

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(cls, embeddings: np.ndarray, out_dim: int | None = None,
            eps: float = 1e-6) -> PCAWhitening:
        """Fit on a sample [n, dim]; ``out_dim`` keeps the leading components (<= n - 1)."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise InvalidRequestError(
                f"PCA-whitening needs a [n >= 2, dim] sample, got shape {x.shape}")
        n, dim = x.shape
        k = min(out_dim or dim, dim, n - 1)
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigval)[::-1][:k]
        proj = eigvec[:, order] / np.sqrt(eigval[order] + eps)
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """Whiten and L2-normalise [n, in_dim] -> [n, out_dim] float32."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise InvalidRequestError(
                f"PCA-whitening expects [n, {self.in_dim}] embeddings, got shape {x.shape}")
        y = (x - self.mean) @ self.projection
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return (y / np.maximum(norms, 1e-12)).astype(np.float32)

    @property
    def fingerprint(self) -> str:
        """``pca<out_dim>:<digest>``: names this exact transform in a ``ModelSpec``."""
        h = hashlib.sha256(self.mean.astype("<f4").tobytes())
        h.update(self.projection.astype("<f4").tobytes())
        return f"pca{self.out_dim}:{h.hexdigest()[:16]}"

    def whiten_spec(self, spec: ModelSpec) -> ModelSpec:
        """The space of ``apply``'s output for embeddings from ``spec``: the index's spec.
        (Another model's spec stays another spec, so comparing with the index's refuses it.)"""
        if spec.whitening:
            raise IncompatibleModelError(f"{spec.describe()} is whitened already")
        return replace(spec, dim=self.out_dim, whitening=self.fingerprint)

    def unwhiten_spec(self, spec: ModelSpec) -> ModelSpec:
        """The embedder's own space behind an index spec this whitening made (what a head takes)."""
        if spec.whitening != self.fingerprint:
            raise IncompatibleModelError(
                f"{spec.describe()} was not whitened by {self.fingerprint}")
        return replace(spec, dim=self.in_dim, whitening="")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/whitening.npz`` atomically (a crash leaves the old file or a .tmp
        that the store removes when it opens)."""
        path = Path(directory) / WHITENING_FILE
        write_atomic(path, lambda f: np.savez(f, mean=self.mean, projection=self.projection))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], spec: ModelSpec) -> PCAWhitening | None:
        """The whitening an index at ``directory`` with ``spec`` was built with; None when the
        spec says unwhitened. Refuses a missing file or one that is not the spec's transform."""
        if not spec.whitening:
            return None
        path = Path(directory) / WHITENING_FILE
        try:
            with np.load(path) as z:
                w = cls(z["mean"].astype(np.float32), z["projection"].astype(np.float32))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing, cut short, damaged
            why = "not a whitening file" if "pickle" in str(e) else str(e)  # numpy's advice misleads here
            raise IncompatibleModelError(
                f"index {directory} is PCA-whitened ({spec.whitening}) but {path} is missing or "
                f"unreadable ({why}); rebuild the index") from e
        if w.fingerprint != spec.whitening:
            raise IncompatibleModelError(
                f"{path} holds whitening {w.fingerprint}, but the index was built with "
                f"{spec.whitening}; rebuild the index")
        return w


def open_index(path: str | os.PathLike[str], *, rebuild_in_background: bool = False
               ) -> tuple[IndexStore, PCAWhitening | None, ModelSpec]:
    """The index store at ``path``, its whitening, and the spec of the embeddings it was built
    from (unwhitened: what an embedder or a head must produce). Closes the store on error."""
    from pictor.core.store import IndexStore

    if Path(path).exists() and not Path(path).is_dir():
        raise NotFoundError(f"{path} is a file, not an index (a folder that `pictor index GALLERY --out DIR` makes)")
    if not Path(path).is_dir():
        raise NotFoundError(
            f"index directory {path} does not exist; build one with `pictor index GALLERY --out {path}`")
    store = IndexStore.open(path, rebuild_in_background=rebuild_in_background)
    with contextlib.ExitStack() as on_error:
        on_error.callback(store.close, snapshot=False)  # a refused open must not keep the index locked
        whitening = PCAWhitening.load(path, store.spec)
        spec = store.spec if whitening is None else whitening.unwhiten_spec(store.spec)
        on_error.pop_all()  # opened: the caller closes it
    return store, whitening, spec


def create_index(path: Path, spec: ModelSpec, whitening: PCAWhitening | None, *,
                 index_type: str, precision: str | None = None) -> IndexStore:
    """A new index store at ``path`` (a new or empty folder) for an embedder with ``spec``, with
    its whitening saved in it before the manifest marks the store made: a store never holds
    vectors it cannot explain, and a creation cut off is one the next run makes anew."""
    from pictor.core.store import IndexStore

    return IndexStore.create(path, index_spec(spec, whitening), index_type=index_type, precision=precision,
                             files=None if whitening is None else whitening.save)


def index_spec(spec: ModelSpec, whitening: PCAWhitening | None) -> ModelSpec:
    """The spec of the vectors an index holds: the embedder's, whitened when it is."""
    return spec if whitening is None else whitening.whiten_spec(spec)
