"""A FAISS index over explicit int64 ids: build, add, remove, search with per-request params.

``VectorIndex`` hides what differs between FAISS index types so the store can treat them alike:

- ids: IVF indexes take ids natively; every other type is wrapped in ``IndexIDMap2``.
- removal: where FAISS cannot remove (HNSW, refine wrappers) removed ids become tombstones,
  excluded at search time through an ``IDSelector``; ``tombstone_ratio`` tells the store when
  a compaction (rebuild) is due.
- search parameters: nprobe / efSearch / k_factor are passed as FAISS ``SearchParameters``
  objects (one per setting, shared by searches without a selector; built per search with
  one), so concurrent searches never change shared index state.

Index types are FAISS factory strings (``"Flat"``, ``"HNSW32"``, ``"IVF1024,PQ32"``,
``"OPQ64,IVF4096,PQ64x4fs,Refine(SQfp16)"``); the metric is always inner product on
L2-normalised vectors. Not thread-safe for writes: the store serialises writers and keeps
readers out while an index is mutated.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import timeit
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from pictor.api import MAX_WIDTH
from pictor.core.files import write_atomic
from pictor.errors import InvalidRequestError

log = logging.getLogger(__name__)

EXACT_FACTORY = "Flat"
# OpenMP threads of batched FAISS work (training, adding, batched search): FAISS's default,
# read once at import.
_BATCH_OMP_THREADS = faiss.omp_get_max_threads()


def _use_omp_threads(threads: int) -> None:
    """Set this thread's OpenMP team size for FAISS calls; it stays set (see search_checked)."""
    if faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)


# The k that search defaults are tuned at (recall@10): a search for more results widens them.
TUNED_K = 10


class SnapshotMismatchError(RuntimeError):
    """A snapshot file that is not the one its manifest names (checksum differs)."""


@dataclass(frozen=True)
class SearchKnobs:
    """Resolved search parameters for one request (0 = leave the index's own default)."""

    nprobe: int = 0
    ef_search: int = 0
    k_factor: float = 0.0

    def for_k(self, k: int) -> SearchKnobs:
        """These knobs, tuned for ``TUNED_K`` results, widened in proportion for ``k``: the
        lists scanned or the graph beam must hold k true neighbours, not 10. At a tuned
        nprobe, recall@100 fell to 0.77 and recall@1000 to 0.15; in proportion, 0.97 and 0.96
        (50k synthetic embeddings; HNSW 0.990 and 0.996). Unset knobs stay unset."""
        if k <= TUNED_K:
            return self

        def widened(knob: int) -> int:
            return min(math.ceil(knob * k / TUNED_K), MAX_WIDTH)

        return SearchKnobs(nprobe=widened(self.nprobe), ef_search=widened(self.ef_search), k_factor=self.k_factor)

    def scaled(self, factor: int) -> SearchKnobs:
        """The same knobs ``factor`` times wider (to escalate a search that came back short);
        unset knobs start from FAISS's defaults (nprobe 1, efSearch 16, k_factor 1)."""
        return SearchKnobs(
            nprobe=min(max(self.nprobe, 1) * factor, MAX_WIDTH),
            ef_search=min(max(self.ef_search, 16) * factor, MAX_WIDTH),
            k_factor=max(self.k_factor, 1.0) * factor,
        )


_N = r"([1-9][0-9]{0,5})"  # a count: no 0, no sign, at most 6 digits
_SQ = r"SQ(?:4|6|8|fp16|bf16)"
_CODES = r"(?:Flat|" + _SQ + r"|PQ" + _N + r"(?:x" + _N + r")?(?:fsr?)?)"
_RERANK = r"(?:,RFlat|,Refine\((?:Flat|" + _SQ + r")\))?"
# The factory strings a new index may have: the families the store is built and tested for
# (exact, HNSW, IVF with flat, scalar or product codes, optional PCA / OPQ / rotation first and
# a re-rank after). FAISS parses far more, and some of it crashes the process or fails only
# once the store holds vectors (HNSW1, PQ32x0, RQ, NSG below 100 items, Refine over an IVF).
# A re-rank only over HNSW or an IVF: FAISS's flat code indexes take no search parameters.
# No PCA-whitening (PCAW): its scores are not the cosines that the store's exact searches
# (filters, tuning) give, nor its ranking; `pictor index --pca-whiten` whitens the vectors.
_SUPPORTED_FACTORY = re.compile(
    r"(?:(?:PCAR?" + _N + r"|OPQ" + _N + r"(?:_" + _N + r")?|RR" + _N + r"),)*"
    r"(?:HNSW" + _N + r"(?:_(?:Flat|" + _SQ + r")|,Flat)?" + _RERANK
    + r"|IVF" + _N + r"(?:_HNSW" + _N + r")?," + _CODES + _RERANK
    + r"|" + _CODES + r")"
)
MAX_IVF_LISTS = 65_536  # 4 sqrt(n) lists reach it at 268M items; its centroids take 335 MB at dim 1280
MAX_HNSW_M = 256


def check_new_factory(dim: int, factory: str) -> None:
    """Refuse, with a message that says what is supported, a factory string outside the
    families a new index may have (``parse_factory`` then checks what FAISS builds)."""
    check_factory_form(factory)
    if any(int(n) > 4 * dim for n in re.findall(r"RR([0-9]+)", factory)):
        raise InvalidRequestError(f"index type {factory!r}: at most {4 * dim:,} rotated dims")
    if (first := re.match(r"OPQ([0-9]+),", factory)) and dim % int(first[1]):  # its output keeps dim
        raise InvalidRequestError(f"index type {factory!r}: OPQ<M> needs the {dim} dims to be a multiple of M")
    parse_factory(dim, factory)


def check_factory_form(factory: str) -> None:
    """The checks of ``check_new_factory`` that need no embedding dim: made before a model loads."""
    if not _SUPPORTED_FACTORY.fullmatch(factory):
        raise InvalidRequestError(
            f"index type {factory!r} is not one the index supports: [PCA<d>|PCAR<d>|OPQ<M>[_<d>]|"
            "RR<d>,]... then Flat, SQ8, SQfp16, PQ<M>[x<bits>][fs], HNSW<M>[_SQ8], or IVF<lists>[_HNSW<M>],"
            "Flat|SQ8|SQfp16|PQ<M>[x<bits>][fs]; the last two optionally then ,RFlat or ,Refine(Flat|SQfp16). "
            "E.g. auto, Flat, HNSW32, IVF1024,Flat, OPQ32,IVF1024,PQ32, IVF1024,PQ64x4fs,Refine(SQfp16)"
            + ("; to whiten, `pictor index --pca-whiten DIM`" if "PCAW" in factory else ""))
    def counts(pattern: str) -> list[int]:
        return [int(n) for n in re.findall(pattern, factory)]

    hnsw_m = counts(r"HNSW([0-9]+)")
    for name, limit, found in (("IVF lists", MAX_IVF_LISTS, counts(r"IVF([0-9]+)")),
                               ("HNSW links (M)", MAX_HNSW_M, hnsw_m),
                               ("PQ bits", 16, counts(r"PQ[0-9]+x([0-9]+)"))):
        if any(n > limit for n in found):
            raise InvalidRequestError(f"index type {factory!r}: at most {limit:,} {name}")
    if any(m < 2 for m in hnsw_m):
        raise InvalidRequestError(f"index type {factory!r}: HNSW needs at least 2 links (M)")
    if any(int(d) % int(m) for m, d in re.findall(r"OPQ([0-9]+)_([0-9]+)", factory)):
        raise InvalidRequestError(f"index type {factory!r}: OPQ<M>_<d> needs d to be a multiple of M")


def parse_factory(dim: int, factory: str) -> faiss.Index:
    """Build an empty FAISS index from a factory string, or raise ``InvalidRequestError``."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        why = re.sub(r"^Error in .*? at \S+:\d+: ", "", last)  # FAISS's C++ location: noise here
        raise InvalidRequestError(
            f"index type {factory!r} is not a valid FAISS factory string for dim {dim}: {why} "
            "(e.g. auto, Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32; see the FAISS wiki's "
            "'The index factory')"
        ) from e
    # What FAISS builds but could never train or search: refused now, not after a store holds
    # vectors it can then neither index nor open.
    for transform in _transforms(index):
        if isinstance(transform, faiss.PCAMatrix) and transform.d_out > transform.d_in:
            raise InvalidRequestError(f"index type {factory!r}: PCA can reduce {transform.d_in} dims, "
                                      f"not raise them to {transform.d_out}")
    # Polysemous training (on by default for 8-bit PQ) takes minutes and only serves
    # Hamming-threshold search, which the store never uses.
    for layer in _layers(index):
        if hasattr(layer, "do_polysemous_training"):
            layer.do_polysemous_training = False
    return index


def _transforms(index: faiss.Index) -> list[Any]:
    """The vector transforms (PCA, OPQ, ...) applied before the index searches; ``index`` must
    stay referenced while they are used (FAISS owns them)."""
    found = []
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexPreTransform):
            chain: Any = layer.chain  # a SWIG vector (its stubs say list)
            found += [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())]
    return found


def _layers(index: faiss.Index) -> list[Any]:
    """The chain of wrappers down to the searching index: id map, transforms, refine, leaf."""
    layers: list[Any] = []
    node: Any = index
    while node is not None:
        node = faiss.downcast_index(node)
        layers.append(node)
        if isinstance(node, faiss.IndexIDMap2 | faiss.IndexIDMap | faiss.IndexPreTransform):
            node = node.index
        elif isinstance(node, faiss.IndexRefine):
            node = node.base_index
        else:
            node = None
    return layers


@lru_cache(maxsize=64)  # parses the factory: the store asks on every growth check
def training_size(dim: int, factory: str) -> int:
    """How many vectors ``factory`` needs before it can be trained (0 when it needs none)."""
    index = parse_factory(dim, factory)
    if index.is_trained:
        return 0
    need = 1
    per_centroid = faiss.ClusteringParameters().min_points_per_centroid  # FAISS k-means warns below (39)
    for transform in _transforms(index):
        if transform.is_trained:
            continue
        if isinstance(transform, faiss.OPQMatrix):  # trains a PQ of 256 centroids per sub-vector
            need = max(need, per_centroid * 256)
        elif isinstance(transform, faiss.PCAMatrix | faiss.ITQTransform):  # centred: rank n - 1
            need = max(need, transform.d_out + 1)
    if re.search(r"SQ[468]\b", factory):  # 4-8 bit ranges per dim: from one vector, all codes alike
        need = max(need, 1000)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, per_centroid * ivf.nlist)
    pq = _find_pq(index)
    if pq is not None:
        need = max(need, per_centroid * pq.ksub)
    return need


def _find_pq(index: faiss.Index) -> Any:
    """The product quantizer inside ``index``, if any (for its training needs)."""
    return getattr(_layers(index)[-1], "pq", None)


class VectorIndex:
    """One FAISS index with explicit ids, tombstones where removal is impossible, and params.

    Create with ``VectorIndex.build(dim, factory, training_vectors)`` or ``VectorIndex.load``.
    """

    def __init__(self, index: faiss.Index, factory: str, removable: bool) -> None:
        self.index = index
        self.dim = int(index.d)  # fixed for the index's life; a SWIG attribute read costs
        self.factory = factory
        self.removable = removable
        self._dead: set[int] = set()
        self._dead_selector: Any = None  # cached IDSelectorNot over the tombstones
        # The last filter's selector: a filtered request searches several widths with one array.
        self._last_selector: tuple[np.ndarray | None, Any, list[Any]] = (None, None, [])
        self._params_cache: dict[SearchKnobs, tuple[Any, list[Any]]] = {}
        self._last_params: tuple[SearchKnobs | None, Any] = (None, None)  # see _search_params
        self._layers = _layers(self.index)

    def copy(self) -> VectorIndex:
        """An independent copy, tombstones included (as much memory again)."""
        twin = VectorIndex(faiss.clone_index(self.index), self.factory, self.removable)
        twin._dead = set(self._dead)
        return twin

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(cls, dim: int, factory: str, train: np.ndarray | None = None) -> VectorIndex:
        """An empty, trained index of type ``factory``; ``train`` is needed unless it trains
        on nothing (Flat, HNSW)."""
        index = parse_factory(dim, factory)
        _use_omp_threads(_BATCH_OMP_THREADS)  # this thread may have searched single queries
        if not index.is_trained:
            if train is None or len(train) == 0:
                raise InvalidRequestError(f"index type {factory!r} needs training vectors")
            index.train(np.ascontiguousarray(train, dtype=np.float32))
        if not _accepts_ids(index):
            index = faiss.IndexIDMap2(index)
        return cls(index, factory, removable=_can_remove(index))

    @classmethod
    def load(cls, path: Path, factory: str, crc32: int | None = None) -> VectorIndex:
        """Read a snapshot written by ``save``; tombstones are recomputed by the caller.

        ``crc32``: what ``save`` returned; a file that differs (damaged, or another index's)
        raises ``SnapshotMismatchError``. FAISS reads what looks like an index without
        noticing flipped bits in its vectors.
        """
        index = faiss.read_index(str(path)) if crc32 is None else _read_checked(path, crc32)
        return cls(index, factory, removable=_can_remove(index))

    def save(self, path: Path) -> int:
        """Write atomically: temp file, fsync, rename over ``path``, fsync the directory.
        Returns the file's CRC-32, for ``load`` to check.

        ``faiss.write_index`` writes in place, so a crash mid-write would tear the file.
        """
        crc = 0

        def write(f: IO[bytes]) -> None:
            def chunk(data: bytes) -> int:
                nonlocal crc
                crc = zlib.crc32(data, crc)
                return f.write(data)

            faiss.write_index(self.index, faiss.PyCallbackIOWriter(chunk))  # type: ignore[attr-defined]

        write_atomic(path, write)
        return crc

    # -- contents -------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Vectors physically in the index, tombstones included."""
        return int(self.index.ntotal)

    @property
    def live(self) -> int:
        return self.ntotal - len(self._dead)

    @property
    def tombstones(self) -> int:
        return len(self._dead)

    @property
    def tombstone_ratio(self) -> float:
        return len(self._dead) / self.ntotal if self.ntotal else 0.0

    def ids(self) -> np.ndarray:
        """Every id physically in the index (tombstoned ones included), unordered."""
        if isinstance(self.index, faiss.IndexIDMap2 | faiss.IndexIDMap):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)
        ivf = faiss.extract_index_ivf(self.index)
        invlists: Any = ivf.invlists  # FAISS's stubs miss release_ids
        parts = []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(lst, ptr)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def set_tombstones(self, dead: Iterable[int]) -> None:
        """Mark ids that are in the index but no longer live (after loading a snapshot)."""
        self._dead = {int(i) for i in dead}
        self._dead_selector = None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add normalised float32 ``vectors`` under int64 ``ids`` (ids are never reused)."""
        if len(ids):
            _use_omp_threads(_BATCH_OMP_THREADS)
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32),
                np.ascontiguousarray(ids, dtype=np.int64),
            )

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids``; where FAISS cannot, they become tombstones filtered at search time."""
        if not len(ids):
            return
        if self.removable:
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64)))
        else:
            self._dead.update(int(i) for i in ids)
            self._dead_selector = None

    # -- search ---------------------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """Whether search is exhaustive (no knobs to tune, never short of results)."""
        return all(isinstance(ly, faiss.IndexFlat | faiss.IndexIDMap2) for ly in self._layers)

    def knob_ladders(self) -> list[list[SearchKnobs]]:
        """Candidate search settings for tuning: one ladder per refine factor, each ordered
        from cheapest to most thorough."""
        ivf = next((ly for ly in self._layers if isinstance(ly, faiss.IndexIVF)), None)
        hnsw = next((ly for ly in self._layers if isinstance(ly, faiss.IndexHNSW)), None)
        refine = any(isinstance(ly, faiss.IndexRefine) for ly in self._layers)
        # Steps of about sqrt(2): at 1M items nprobe 3 or 6 can meet a recall target at
        # markedly less cost than the next power of two.
        k_factors = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0] if refine else [0.0]
        if ivf is not None:
            ladder = sorted({round(2 ** (i / 2)) for i in range(24)})
            steps = [p for p in ladder if p <= ivf.nlist]
            return [[SearchKnobs(nprobe=p, k_factor=f) for p in steps] for f in k_factors]
        if hnsw is not None:
            efs = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
            return [[SearchKnobs(ef_search=e, k_factor=f) for e in efs] for f in k_factors]
        return [[SearchKnobs(k_factor=f)] for f in k_factors]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        knobs: SearchKnobs,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query; ids -1 where fewer were found.

        ``allowed`` (sorted int64 ids of live items: it takes the tombstones' place, so none may
        be among them) restricts the search; without it, tombstones are excluded.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # no copy when it is already
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.search_checked(queries, k, knobs, allowed)

    def search_checked(
        self,
        queries: np.ndarray,
        k: int,
        knobs: SearchKnobs,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``search`` for queries known to be C-contiguous float32 [n, dim], as
        ``IndexStore.check_vectors`` returns them: FAISS reads their memory as is, without
        the checks and copies of its Python wrapper (a tenth of the store's overhead on one
        query)."""
        # One query gains nothing from OpenMP, and server threads each starting a team
        # would oversubscribe the cores. The setting is per calling thread and left as set:
        # a server thread asking single queries then pays one FAISS call, not three.
        _use_omp_threads(1 if len(queries) == 1 else _BATCH_OMP_THREADS)
        params, _alive = self._search_params(knobs, allowed)  # alive until FAISS returns
        n = len(queries)
        scores = np.empty((n, k), np.float32)
        ids = np.empty((n, k), np.int64)
        self.index.search_c(  # type: ignore[attr-defined]  # FAISS's SWIG method, untyped
            n, faiss.swig_ptr(queries), k, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params
        )
        return scores, ids

    def _search_params(self, knobs: SearchKnobs, allowed: np.ndarray | None) -> tuple[Any, Any]:
        """(SearchParameters, what must stay alive while FAISS uses them) for one search."""
        if allowed is None and not self._dead:
            # No selector: FAISS only reads the params, so threads may share them. Callers
            # reuse one knobs object per setting, so an identity check skips the dict.
            last_knobs, shared = self._last_params
            if last_knobs is not knobs:
                shared = self._shared_params(knobs)
                self._last_params = (knobs, shared)  # one assignment: readers see a pair
            return shared
        selector, alive = self._selector(allowed)
        params, alive_params = self._params(knobs, selector)
        return params, (alive, alive_params)

    def _shared_params(self, knobs: SearchKnobs) -> tuple[Any, list[Any]]:
        """(params, keepalive) for ``knobs`` without a selector, built once per setting."""
        cached = self._params_cache.get(knobs)
        if cached is None:
            if len(self._params_cache) > 64:  # per-request knobs: keep the cache small
                self._params_cache.clear()
            cached = self._params_cache[knobs] = self._params(knobs, None)
        return cached

    def _selector(self, allowed: np.ndarray | None) -> tuple[Any, list[Any]]:
        if allowed is not None:
            # Live ids only come from the database, so tombstones are excluded already.
            last, sel, alive = self._last_selector
            if last is not allowed:  # the tuple holds the array, so its identity is not reused
                sel = faiss.IDSelectorBatch(allowed)
                alive = [allowed, sel]
                self._last_selector = (allowed, sel, alive)  # one assignment: readers see a triple
            return sel, alive
        if not self._dead:
            return None, []
        if self._dead_selector is None:
            dead = np.fromiter(self._dead, np.int64, len(self._dead))
            batch = faiss.IDSelectorBatch(dead)
            not_dead = faiss.IDSelectorNot(batch)
            self._dead_selector = (not_dead, [dead, batch])
        return self._dead_selector[0], [self._dead_selector]

    def _params(self, knobs: SearchKnobs, selector: Any) -> tuple[Any, list[Any]]:
        """FAISS SearchParameters for this request, innermost layer first; (params, keepalive).

        SWIG params hold raw pointers, so every object built here is returned to be kept
        alive until the search is over.
        """
        keep: list[Any] = []
        params: Any = None
        # The selector sits on the innermost searching layer, translated through an id map.
        idmap = next(
            (ly for ly in self._layers if isinstance(ly, faiss.IndexIDMap2 | faiss.IndexIDMap)),
            None,
        )
        if selector is not None and idmap is not None:
            selector = faiss.IDSelectorTranslated(idmap.id_map, selector)  # type: ignore[arg-type]  # stubs: only arrays
            keep.append(selector)
        for layer in reversed(self._layers):
            if isinstance(layer, faiss.IndexIVF):
                params = faiss.SearchParametersIVF()
                if knobs.nprobe:
                    params.nprobe = min(knobs.nprobe, layer.nlist)
                else:
                    params.nprobe = layer.nprobe
                quantizer = faiss.downcast_index(layer.quantizer)
                if isinstance(quantizer, faiss.IndexHNSW):
                    qp = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in FAISS's stubs
                    qp.efSearch = max(params.nprobe * 2, quantizer.hnsw.efSearch)
                    params.quantizer_params = qp
                    keep.append(qp)
            elif isinstance(layer, faiss.IndexHNSW):
                params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
                params.efSearch = knobs.ef_search or layer.hnsw.efSearch
            elif isinstance(layer, faiss.IndexRefine):
                refine = faiss.IndexRefineSearchParameters()
                refine.k_factor = knobs.k_factor or layer.k_factor
                if params is None:
                    params = faiss.SearchParameters()
                refine.base_index_params = params
                keep.append(params)
                params = refine
                continue
            elif isinstance(layer, faiss.IndexPreTransform):
                if params is not None:
                    pre = faiss.SearchParametersPreTransform()
                    pre.index_params = params
                    keep.append(params)
                    params = pre
                continue
            elif isinstance(layer, faiss.IndexIDMap2 | faiss.IndexIDMap):
                continue
            else:  # flat and other leaf indexes
                params = faiss.SearchParameters() if selector is not None else None
            if params is not None and selector is not None:
                params.sel = selector
        return params, keep


def recall_at_k(
    found: np.ndarray, truth: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> float:
    """Mean share of each query's true top-``k`` ids found in its top-``k`` results.

    ``exclude`` (one id per query) is dropped from both first: a stored item used as a
    query would otherwise trivially find itself.
    """
    return float(per_query_recall(found, truth, k, exclude).mean()) if len(found) else 0.0


def per_query_recall(
    found: np.ndarray, truth: np.ndarray, k: int, exclude: np.ndarray | None = None,
    tied: np.ndarray | None = None,
) -> np.ndarray:
    """Each query's share of its true top-``k`` ids found (see ``recall_at_k``).

    ``tied`` (shaped as ``found``): True where a found id outside the true top ``k`` scores as
    high as the ``k``-th of them. It counts as found: copies of one vector tie, and the exact
    search and FAISS may each return any of them.
    """
    out = np.empty(len(found))
    for j in range(len(found)):
        skip = -2 if exclude is None else int(exclude[j])
        cols = [c for c, i in enumerate(found[j]) if i >= 0 and i != skip][:k]
        want = set([int(i) for i in truth[j] if i >= 0 and i != skip][:k])
        hits = sum(int(found[j, c]) in want or (tied is not None and bool(tied[j, c])) for c in cols)
        out[j] = min(hits, len(want)) / max(len(want), 1)
    return out


def ties_with_kth(
    found: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    truth_scores: np.ndarray,
    k: int,
    exclude: np.ndarray | None,
    vectors_of: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Where ``found`` holds an id outside its query's true top ``k`` whose exact score reaches
    the ``k``-th true score (within float rounding): the ``tied`` of ``per_query_recall``.

    ``vectors_of(ids)`` returns the stored vectors of ``ids`` (sorted, unique) in that order;
    only ids outside the truth are looked up (few, once the recall is high).
    """
    skip = np.full(len(found), -2) if exclude is None else exclude
    # The k-th true score of each query, its own entry left out.
    kth = np.full(len(found), np.inf, np.float32)
    for j in range(len(truth)):
        scores = truth_scores[j][(truth[j] >= 0) & (truth[j] != skip[j])]
        if len(scores) >= k:
            kth[j] = scores[k - 1]
    outside = (found >= 0) & (found != skip[:, None]) & ~(found[:, :, None] == truth[:, None, :]).any(-1)
    tied = np.zeros(found.shape, bool)
    rows, cols = np.nonzero(outside & np.isfinite(kth)[:, None])
    if len(rows):
        ids, where = np.unique(found[rows, cols], return_inverse=True)
        scores = np.einsum("ij,ij->i", queries[rows], vectors_of(ids)[where])
        tied[rows, cols] = scores >= kth[rows] - 1e-5
    return tied


# One-sided 95% normal quantile: a setting is taken when the recall its tuning queries
# measure is above the target by this many standard errors.
_TUNING_CONFIDENCE_Z = 1.645


def tune_knobs(
    index: VectorIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float,
    k: int = 10,
    exclude: np.ndarray | None = None,
    ties: Callable[[np.ndarray], np.ndarray] | None = None,
    step: Callable[[], None] | None = None,
) -> tuple[SearchKnobs, float]:
    """The fastest search setting reaching recall@``k`` >= ``target`` and its recall.

    ``ties(found)``: the ``tied`` mask of ``per_query_recall`` for these results (see
    ``ties_with_kth``); without it, a tie found in place of its twin counts as missed.
    ``step()``: called before each setting is tried; raising in it stops the tuning (a
    background re-tuning of a store being closed: seconds of settings at 1M items).

    Walks each ladder of ``index.knob_ladders()`` up to the first setting that reaches the
    target (thoroughness only costs time beyond it) and keeps the one fastest at single
    queries; when none does, the setting with the best recall. "Reaches" means with 95%
    confidence: the tuning queries are a sample, and a setting whose sample recall only
    just touches the target lands below it on other queries about half the time.
    """
    if index.exact:
        return SearchKnobs(), 1.0
    fetch = k + 1 if exclude is not None else k
    best: tuple[float, SearchKnobs, float] | None = None
    fallback = (-1.0, SearchKnobs())
    for ladder in index.knob_ladders():
        for knobs in ladder:
            if step is not None:
                step()
            _, found = index.search(queries, fetch, knobs)
            per_query = per_query_recall(found, truth, k, exclude, None if ties is None else ties(found))
            recall = float(per_query.mean())
            if recall > fallback[0]:
                fallback = (recall, knobs)
            if _lower_bound(per_query) >= target:
                # Timed one query per call, as the server searches; the best of 3 runs, as
                # others' work on a shared CPU only slows a run.
                run = functools.partial(_search_one_by_one, index, queries, fetch, knobs)
                elapsed = min(timeit.repeat(run, number=1, repeat=3))
                if best is None or elapsed < best[0]:
                    best = (elapsed, knobs, recall)
                break
    if best is None:
        log.warning(
            "no search setting of %s reached recall@%d %.3f with 95%% confidence on %d tuning "
            "queries; using the one with the best recall, %s (%.3f)",
            index.factory, k, target, len(queries), fallback[1], fallback[0],
        )
        return fallback[1], fallback[0]
    return best[1], best[2]


def _lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean of ``per_query``."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    se = float(per_query.std(ddof=1)) / math.sqrt(len(per_query))
    return float(per_query.mean()) - _TUNING_CONFIDENCE_Z * se


def _search_one_by_one(index: VectorIndex, queries: np.ndarray, k: int, knobs: SearchKnobs) -> None:
    for i in range(len(queries)):
        index.search(queries[i : i + 1], k, knobs)


def _accepts_ids(index: faiss.Index) -> bool:
    """Whether ``index`` (trained) takes explicit ids itself; others need an id map."""
    try:
        index.add_with_ids(
            np.zeros((0, index.d), dtype=np.float32), np.zeros(0, dtype=np.int64)
        )
    except RuntimeError:
        return False
    return True


def _read_checked(path: Path, crc32: int) -> faiss.Index:
    """``faiss.read_index`` of ``path``, computing the file's CRC-32 in the same pass."""
    crc = 0
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            nonlocal crc
            chunk = f.read(n)
            crc = zlib.crc32(chunk, crc)
            return chunk

        index = faiss.read_index(faiss.PyCallbackIOReader(read))  # type: ignore[attr-defined]  # not in FAISS's stubs
        while rest := f.read(1 << 20):  # bytes after the index count too
            crc = zlib.crc32(rest, crc)
    if crc != crc32:
        raise SnapshotMismatchError(f"{path.name} has CRC-32 {crc:#010x}, its manifest says {crc32:#010x}")
    return index


def _can_remove(index: faiss.Index) -> bool:
    """Whether FAISS can remove from ``index``; probed with an empty removal."""
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.zeros(0, dtype=np.int64)))
    except RuntimeError:
        return False
    return True
