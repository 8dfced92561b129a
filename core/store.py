"""IndexStore: similar-image search over a FAISS index, with metadata, filters and durability.

A store is one directory::

    manifest.json        format version, ModelSpec, dim, metric, index type and parameters,
                         counts, created/updated, and which operations the snapshot contains
    metadata.sqlite      the source of truth (WAL, synchronous=FULL): items with key, int64 id,
                         label, attributes (JSON), the float32 vector, and the op sequence
    faiss-<seq>.index    FAISS snapshot holding every operation up to <seq> (faiss-<seq>-<n>.index
                         when the same operations are saved again, rebuilt or re-tuned)

Writes commit to SQLite first, so an upsert or delete is durable when it returns; the FAISS
index in memory is then updated under the same lock, so readers never see the database and
the index disagree. The snapshot is saved atomically (``snapshot()``, every
``snapshot_every`` changed items, and on ``close()``); on open it is brought up to date with
the database from the op sequence, and rebuilt from the stored vectors if it cannot be.

Ids: every upsert gets fresh int64 ids (never reused), so a tombstoned id can never hide a
newer vector. Example::

    with IndexStore.create("gallery.idx", embedder.spec) as store:
        store.upsert([Item("cat.jpg", label="cat")], embedder.embed([image]))
        hits = store.search(query_vectors, k=10, filter=Filter(labels=("cat",)))

This module holds ``IndexStore``; its parts live beside it in ``pictor.core``: ``store_types``
(the public types, re-exported here), ``_store_files`` (the folder: file names, manifest, lock,
disk errors), ``_store_sql`` (schema, queries, filters as SQL, exact search),
``_store_metadata`` (the metadata of hits), ``_read_write_lock`` and ``backup``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pictor.api import MAX_LIST, MAX_WIDTH, refuse_single
from pictor.core._read_write_lock import _ReadWriteLock
from pictor.core._store_files import (
    DATABASE,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    RESTORE_OR_REBUILD,
    SNAPSHOT_PREFIX,
    SNAPSHOT_SUFFIX,
    _check_writable,
    _empty_folder,
    _lock_directory,
    _now,
    _out_of_space,
    _raise_if_cannot_open,
    _raise_if_cannot_write,
    _read_manifest,
    _refuse_read_only_database,
    _rollback,
    _write_json_atomic,
    half_made_store,
    make_store_dir,
)
from pictor.core._store_metadata import _hits_from_sqlite, _ItemMetadata
from pictor.core._store_sql import (
    _CONTENTS_INDEX,
    _CONTENTS_TABLE,
    _admitted_condition,
    _connect,
    _create_schema,
    _delete_rows,
    _empty_wal,
    _exact_search,
    _filter_parts,
    _ids_for_keys,
    _match_ids,
    _rows_for_keys,
    _stream_vectors,
    _vectors_of,
)
from pictor.core.backup import backup_store
from pictor.core.faiss_index import (
    EXACT_FACTORY,
    TUNED_K,
    SearchKnobs,
    SnapshotMismatchError,
    VectorIndex,
    check_new_factory,
    ties_with_kth,
    training_size,
    tune_knobs,
)
from pictor.core.spec import ModelSpec
from pictor.core.store_types import (
    DeleteResult,
    Filter,
    GetResult,
    Hit,
    Hits,
    Item,
    ItemPage,
    SearchParams,
    StoreInfo,
    StoreOptions,
    UpsertResult,
    _dump_attrs,
    _load_attrs,
    check_utf8,
    checked_items,
    checked_keys,
)
from pictor.errors import (
    IncompatibleModelError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnavailableError,
    shown,
)

# The names other code imports from here (some are defined in the modules beside this one).
__all__ = [
    "AUTO", "DATABASE", "MANIFEST", "METRIC", "DeleteResult", "Filter", "GetResult", "Hit", "Hits",
    "IndexStore", "Item", "ItemPage", "SearchParams", "StoreInfo", "StoreOptions", "UpsertResult",
    "backup_store", "choose_factory", "half_made_store", "make_store_dir",
]

log = logging.getLogger(__name__)

METRIC = "ip"  # inner product on L2-normalised vectors = cosine similarity
AUTO = "auto"
_TRAIN_SAMPLE = 50_000  # vectors to train IVF/PQ on, unless the type needs more
_MIN_TUNE_ITEMS = 500  # search defaults are first re-tuned at twice this many items
# How long a close waits for a background job to reach its next step (FAISS's training of
# a sample, one block of vectors added, a tuning's exact scan, one search setting it tries) before it leaves
# without it.
_MAINTENANCE_STOP_S = 30.0


class _Closing(Exception):
    """Raised in a background job when the store is being closed."""


# -- the store ------------------------------------------------------------------------------


class IndexStore:
    """Vectors, metadata and a FAISS index in one directory; see the module docstring.

    Thread safety: any number of threads may call ``search``/``get_vector``/``info`` while
    one thread at a time writes (writes are serialised internally).

    ``rebuild_in_background``: a rebuild the collection calls for (the exact stand-in giving
    way to a trained type, growth, compaction) runs on a thread of its own from a snapshot of
    the database, so writes go on meanwhile and are applied to the new index before it
    replaces the old one; so does a re-tuning of the search defaults as the collection
    doubles (a server sets it). Off, the write that calls for either does it before it
    returns (a batch load, which waits for it anyway).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], lock_fd: int) -> None:
        self.path = path
        self._manifest = manifest
        self._lock_fd = lock_fd
        self.spec = ModelSpec.from_dict(manifest["spec"])
        self.dim = int(manifest["dim"])
        self.index_type = str(manifest["index_type"])
        self.options = StoreOptions(**manifest.get("options", {}))
        self._write_lock = threading.RLock()  # one writer at a time
        self._rw = _ReadWriteLock()  # readers vs. a writer changing database + index
        self._local = threading.local()
        # Weak: a thread's connection closes when the thread ends (its threading.local goes),
        # and close() closes the ones still alive.
        self._readers: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._db = _connect(path / DATABASE)
        self._closed = False
        self._index: VectorIndex
        self._knobs = SearchKnobs(**manifest.get("search_defaults", {}))
        self._built_for = int(manifest.get("built_for", 0))  # items when last (re)built
        # items when the search defaults were last tuned (HNSW is never re-trained: its
        # defaults are re-tuned as it grows instead)
        self._tuned_for = int(manifest.get("tuned_for", self._built_for))
        self._count = self._scalar("SELECT COUNT(*) FROM items")
        # A copy of the items table kept in memory so the search path does not pay a SQLite
        # query per request (None: query SQLite).
        self._metadata: _ItemMetadata | None = None
        if self.options.metadata_in_memory:
            self._metadata = _ItemMetadata.load(self._db)
        self._seq = int(self._meta("seq"))
        self._snapshot_seq = -1
        self._dirty = False  # index differs from the snapshot on disk
        self._pending = 0  # items changed since the last snapshot
        self._bulk = 0  # depth of open bulk() blocks: maintenance waits for the last one
        self.rebuild_in_background = False
        # The database seq a background rebuild or re-tuning started from (None: none running);
        # deletions after it are kept for a rebuild to apply.
        self._maintenance_base: int | None = None
        self._maintenance: threading.Thread | None = None  # the thread of the last such job
        self._closing = False  # close() has begun: a background job stops at its next step, none starts
        self._rebuilding = ""  # the factory a background rebuild makes
        self._said_gone = False  # whether the log has said that the folder was deleted
        self._label_counts: tuple[int, dict[str, int]] | None = None  # (seq, counts) when last counted

    # -- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        spec: ModelSpec,
        *,
        index_type: str = AUTO,
        options: StoreOptions | None = None,
        files: Callable[[Path], object] | None = None,
        precision: str | None = None,
    ) -> IndexStore:
        """Create an empty store at ``path`` (a new or empty directory, or one where a creation
        was cut off before its manifest: made anew).

        ``index_type`` is ``"auto"`` or a FAISS factory string (``"Flat"``, ``"HNSW32"``,
        ``"IVF1024,Flat"``, ``"IVF1024,PQ32"``, ``"OPQ32,IVF1024,PQ32"``). ``files(path)``
        writes more files of the store (a whitening) before the manifest marks it made.
        ``precision``: what the vectors are computed at ("fp32", "bf16", ...), kept for whoever
        embeds more of them (``IndexStore.precision``).
        """
        _check_spec(spec, optional=False)
        if not isinstance(index_type, str):
            raise InvalidRequestError(f"index_type must be text ('auto' or a FAISS factory string), "
                                      f"got {type(index_type).__name__}")
        root = Path(path)
        taken = InvalidRequestError(
            f"{root} already exists and is not an empty directory (another run may be "
            "creating an index there); choose another path, or open the index in it"
        )
        if root.exists() and (not root.is_dir() or any(root.iterdir())) and not half_made_store(root):
            raise taken
        if index_type != AUTO:
            check_new_factory(spec.dim, index_type)  # refuse a bad factory string now
        options = options or StoreOptions()
        new_dir = not root.exists()
        make_store_dir(root)
        lock_fd = _lock_directory(root)
        leftovers = [p for p in root.iterdir() if p.name != LOCK_FILE]
        if leftovers and half_made_store(root):  # (locked now: no other run is making it)
            log.warning("%s holds the files of an index store whose creation was cut off (no manifest, "
                        "so no items): made anew", root)
            for leftover in leftovers:
                leftover.unlink()
        if any(p.name != LOCK_FILE for p in root.iterdir()):  # a store made there since the check
            os.close(lock_fd)
            raise taken
        try:
            store = cls._create_files(root, spec, index_type, options, lock_fd, files, precision)
        except BaseException as e:
            full = _out_of_space(root, e)  # before the files go, which frees a little
            # Half a store would be refused by the next run ("not an index store"): the folder
            # was empty or new and is locked, so everything in it is this call's.
            os.close(lock_fd)
            _empty_folder(root, remove=new_dir)
            if full:
                raise ResourceExhaustedError(
                    f"the disk holding {root} is full; no index store was created: free space and run again"
                ) from e
            raise
        # Types that need no training (Flat, HNSW) start as themselves, others exact.
        first = index_type if index_type != AUTO else EXACT_FACTORY
        if need := training_size(spec.dim, first):
            log.info("%s is trained once the index holds %d items; until then it searches exactly (Flat)",
                     first, need)
            first = EXACT_FACTORY
        store._index = VectorIndex.build(spec.dim, first)
        log.info("created index store %s (%s, index %s)", root, spec.describe(), index_type)
        return store

    @classmethod
    def _create_files(cls, root: Path, spec: ModelSpec, index_type: str, options: StoreOptions,
                      lock_fd: int, files: Callable[[Path], object] | None, precision: str | None
                      ) -> IndexStore:
        """The database, ``files``' and the manifest of a new store in ``root`` (locked by
        ``lock_fd``)."""
        now = _now()
        db = _connect(root / DATABASE)
        try:
            _create_schema(db, spec, now)
        finally:
            db.close()
        if files is not None:
            files(root)
        manifest = {
            "format": FORMAT_VERSION,
            "spec": spec.to_dict(),
            "dim": spec.dim,
            "metric": METRIC,
            "index_type": index_type,
            "factory": EXACT_FACTORY,
            "built_for": 0,
            "search_defaults": asdict(SearchKnobs()),
            "options": asdict(options),
            **({"precision": precision} if precision else {}),
            "created": now,
            "updated": now,
            "count": 0,
            "snapshot": None,
        }
        _write_json_atomic(root / MANIFEST, manifest)
        return cls(root, manifest, lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, spec: ModelSpec | None = None,
             rebuild_in_background: bool = False) -> IndexStore:
        """Open an existing store, checking and repairing its FAISS index against the database.

        With ``spec``, refuse (``IncompatibleModelError``) a store filled by another model.
        ``rebuild_in_background``: see the class; set here, a rebuild due at open (one a
        closed store left undone) does not hold the open up either.
        """
        _check_spec(spec, optional=True)
        root = Path(path)
        missing = [name for name in (MANIFEST, DATABASE) if not (root / name).is_file()]
        if len(missing) == 2:
            raise NotFoundError(f"no index store at {root} (no {MANIFEST} or {DATABASE})")
        if missing:
            raise NotFoundError(f"index store {root} lacks its {missing[0]}; {RESTORE_OR_REBUILD}")
        lock_fd = _lock_directory(root)
        try:  # the manifest read under the lock: a closing writer may replace it and its snapshot
            _refuse_read_only_database(root)
            store = cls(root, _read_manifest(root / MANIFEST), lock_fd)
        except BaseException as e:
            os.close(lock_fd)
            _raise_if_cannot_open(root, e)
            raise
        try:
            db_spec = ModelSpec.from_dict(json.loads(store._meta("spec")))
            store.spec.check_compatible(db_spec, what=f"the database of {root}")
            if spec is not None:
                store.spec.check_compatible(spec, what="the requested model")
            _check_writable(root, store._db)
            store._db.execute(_CONTENTS_TABLE)  # a store from before content hashes
            store._db.execute(_CONTENTS_INDEX)  # or before they were looked up
            store._recover()
            store.rebuild_in_background = rebuild_in_background
            with store._write_lock:
                store._after_write(0)  # e.g. a bulk load that died before its training
        except BaseException as e:
            store.close(snapshot=False)
            _raise_if_cannot_open(root, e)
            raise
        return store

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def precision(self) -> str | None:
        """What the vectors were computed at, as given at creation (None: not said, as by stores
        made before it was kept)."""
        return self._manifest.get("precision")

    @property
    def seq(self) -> int:
        """The number of the last committed write: it changes with every upsert or delete."""
        return self._seq

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_spec(self, other: ModelSpec, what: str = "query") -> None:
        """Raise ``IncompatibleModelError`` unless ``other`` embeds into this store's space."""
        self.spec.check_compatible(other, what=what)

    def check_vectors(self, vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
        """Validate ``vectors`` ([n, dim] or [dim]) and return them L2-normalised, float32.

        Wrong dim raises ``IncompatibleModelError``; non-finite or zero vectors raise
        ``InvalidRequestError``.
        """
        try:
            arr = np.ascontiguousarray(vectors, dtype=np.float32)  # no copy when it is already
        except (TypeError, ValueError) as e:  # text, None, ragged lists
            raise InvalidRequestError(f"{what} must be numbers: {e}") from None
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise InvalidRequestError(f"{what} must be a [n, {self.dim}] array, got {arr.shape}")
        if arr.shape[1] != self.dim:
            raise IncompatibleModelError(
                f"{what} have dim {arr.shape[1]}, but this index holds dim {self.dim} vectors "
                f"from {self.spec.describe()}"
            )
        # The common single unit query: FAISS's norm (numpy's dot costs 3x), as a scalar.
        if len(arr) == 1 and abs(faiss.fvec_norm_L2sqr(faiss.swig_ptr(arr), self.dim) - 1.0) <= 1e-5:
            return arr  # (the test is also False for NaN)
        # One pass, in float64 (float32 squares overflow from 1e19 and vanish below 1e-19):
        # a NaN or infinity anywhere makes the squared norm non-finite.
        squared = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)
        if not np.isfinite(squared).all():
            raise InvalidRequestError(f"{what}: a NaN or infinite value")
        if not squared.all():
            raise InvalidRequestError(f"{what}: an all-zero vector, which has no direction")
        return np.ascontiguousarray(arr / np.sqrt(squared)[:, None], dtype=np.float32)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filter: Filter | None = None,
        params: SearchParams | None = None,
    ) -> list[Hits]:
        """The ``k`` nearest items to each query (cosine similarity), best first.

        Exactly ``k`` hits per query when at least ``k`` items match ``filter``.
        """
        self._check_open()
        q = self.check_vectors(queries, what="queries")
        if type(k) is not int or k < 1:  # (a bool is not a count either)
            raise InvalidRequestError(f"k must be an int of at least 1, got {shown(k, 40)}")
        if k > TUNED_K:  # FAISS allocates k results per query: a k of 1e9 took 24 GB
            k = min(k, max(1, self._count))
        # A filtered search widens itself until its hits settle (_filtered_search), not by k:
        # widened by k too, HNSW took 7x longer for k=1000 at the same recall.
        wanted = k if filter is None or filter.empty else TUNED_K
        self._rw.acquire_read()
        try:
            # Under the lock: a rebuild (Flat stand-in -> IVF) swaps the index and its defaults.
            knobs = self._knobs if params is None and wanted <= TUNED_K else self._resolve_knobs(params, wanted)
            allowed = None
            if filter is not None and not filter.empty:
                allowed = _match_ids(self._reader(), filter)
                if not len(allowed):
                    return [Hits() for _ in range(len(q))]
            scores, ids = self._search_ids(q, k, knobs, allowed)
            if self._metadata is not None:
                return self._metadata.hits(scores, ids)
            return _hits_from_sqlite(self._reader(), scores, ids)
        finally:
            self._rw.release_read()

    def has_labels(self) -> bool:
        """Whether any item has a label: one index lookup."""
        self._check_open()
        with self._rw.read():
            return self._reader().execute("SELECT 1 FROM items WHERE label > '' LIMIT 1").fetchone() is not None

    def labels_present(self, labels: Iterable[str]) -> set[str]:
        """Which of ``labels`` some item has: one index lookup per label, not a count."""
        self._check_open()
        query = "SELECT 1 FROM items WHERE label = ? LIMIT 1"
        with self._rw.read():
            conn = self._reader()
            return {lab for lab in set(labels) if conn.execute(query, (lab,)).fetchone()}

    def label_counts(self) -> dict[str, int]:
        """Items per label ("" for items without one), from the label index; counted again only
        after a write (a count takes 25-66 ms at 100k items, and Info asks for it each time)."""
        self._check_open()
        with self._rw.read():  # (seq and the database agree under it)
            counted = self._label_counts
            if counted is None or counted[0] != self._seq:
                rows = self._reader().execute("SELECT label, COUNT(*) FROM items GROUP BY label")
                counted = self._label_counts = (self._seq, dict(rows))
            return dict(counted[1])

    def vector_of_content(self, content_hash: str) -> np.ndarray | None:
        """The stored vector of an item whose image file had this sha256 (under any key), or None."""
        self._check_open()
        with self._rw.read():
            row = self._reader().execute(
                "SELECT v.vector FROM contents c JOIN vectors v ON v.id = c.id WHERE c.hash = ? LIMIT 1",
                (content_hash,)).fetchone()
        return None if row is None else np.frombuffer(row[0], np.float32).copy()

    def list_items(self, after: str = "", limit: int = MAX_LIST, filter: Filter | None = None) -> ItemPage:
        """Up to ``limit`` items in key order (by code point) after the key ``after``: those
        ``filter`` admits. The page's ``next``, as the next call's ``after``, gives the next
        page; it is "" on the last."""
        self._check_open()
        if not isinstance(after, str):
            raise InvalidRequestError(f"after must be a key (a string), got {shown(after)}")
        check_utf8(after, "after")
        if type(limit) is not int or not 1 <= limit <= MAX_LIST:
            raise InvalidRequestError(f"limit must be an int from 1 to {MAX_LIST}, got {shown(limit, 40)}")
        sql, args = "SELECT key, label, attributes FROM items WHERE key > ?", [after]
        with self._rw.read():
            conn = self._reader()
            if filter is not None and not filter.empty:
                admitted, more = _admitted_condition(conn, _filter_parts(filter), limit, self._count)
                sql, args = f"{sql} AND {admitted}", [*args, *more]
            # One more row than the page: whether there is a next one.
            rows = conn.execute(f"{sql} ORDER BY key LIMIT ?", [*args, limit + 1]).fetchall()
        items = [Item(key, label, dict(_load_attrs(attrs))) for key, label, attrs in rows[:limit]]
        return ItemPage(items, items[-1].key if len(rows) > limit else "")

    def keys_present(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` the store holds."""
        self._check_open()
        keys = checked_keys(keys)
        with self._rw.read():
            return set(_ids_for_keys(self._reader(), keys))

    def keys_absent_from(self, keys: Iterable[str]) -> list[str]:
        """The store's keys that are not among ``keys``, in key order."""
        self._check_open()
        wanted = set(checked_keys(keys))
        with self._rw.read():
            rows = self._reader().execute("SELECT key FROM items ORDER BY key")
            return [key for (key,) in rows if key not in wanted]

    def get(self, keys: Sequence[str], *, vectors: bool = False) -> GetResult:
        """The stored items of ``keys`` (each once, in the order asked), with their vectors when
        ``vectors``; keys the store does not hold are ``missing``."""
        self._check_open()
        unique = list(dict.fromkeys(checked_keys(keys)))
        with self._rw.read():  # one consistent state across the chunks
            found = _rows_for_keys(self._reader(), unique, vectors=vectors)
        held = [key for key in unique if key in found]
        items = [Item(key, found[key][0], dict(_load_attrs(found[key][1])), found[key][2]) for key in held]
        stacked = None
        if vectors:  # writable (a bytearray), as callers may scale or normalise them
            joined = bytearray(b"".join(found[key][3] for key in held))
            stacked = np.frombuffer(joined, np.float32).reshape(len(held), self.dim)
        return GetResult(items, stacked, [key for key in unique if key not in found])

    def get_item(self, key: str) -> tuple[Item, np.ndarray]:
        """The stored item of ``key`` and its (normalised) vector; ``NotFoundError`` when absent."""
        if not key:
            raise InvalidRequestError("the query key is empty")
        found = self.get([key], vectors=True)
        if found.missing or found.vectors is None:
            raise NotFoundError(f"no item with key {shown(key, 200)} in the index")
        return found.items[0], found.vectors[0]

    def get_vector(self, key: str) -> np.ndarray:
        """The stored (normalised) vector of ``key``; ``NotFoundError`` when absent."""
        return self.get_item(key)[1]

    def info(self) -> StoreInfo:
        """A consistent summary of the store (counts, index in use, search defaults)."""
        self._check_open()
        with self._rw.read():
            return StoreInfo(
                index_type=self.index_type,
                factory=self._index.factory,
                metric=METRIC,
                count=self._count,
                dim=self.dim,
                created=str(self._meta("created", self._reader())),
                updated=str(self._meta("updated", self._reader())),
                spec=self.spec,
                tombstones=self._index.tombstones,
                snapshot_seq=self._snapshot_seq,
                seq=self._seq,
                nprobe=self._knobs.nprobe,
                ef_search=self._knobs.ef_search,
                k_factor=self._knobs.k_factor,
                rebuilding=self._rebuilding,
            )

    # -- writing --------------------------------------------------------------------------

    def upsert(self, items: Sequence[Item], vectors: np.ndarray, *,
               before_write: Callable[[], None] | None = None) -> UpsertResult:
        """Add items, replacing any with the same key; durable when it returns.

        ``before_write`` runs once this call has the write lock, and may raise to call the
        write off (a server's check that its caller still waits, after queueing behind
        another write, which may be a rebuild of the index)."""
        self._check_open()
        refuse_single(items, "items", "for one item, write [item]")
        items = list(items)
        vecs = self.check_vectors(vectors) if len(items) else np.zeros((0, self.dim), np.float32)
        if len(items) != len(vecs):
            raise InvalidRequestError(f"got {len(items)} items but {len(vecs)} vectors")
        items = checked_items(items)
        if not items:
            return UpsertResult(0, 0)
        # Within one call the last occurrence of a key wins, as if upserted one by one.
        last = {item.key: i for i, item in enumerate(items)}
        keep = sorted(last.values())
        dup_replaced = len(items) - len(keep)
        with self._write_lock:
            self._ready_to_write(before_write)
            with self._rw.write():
                old_ids = self._commit_upsert([items[i] for i in keep], vecs[keep])
            replaced = len(old_ids) + dup_replaced
            self._after_write(len(keep) + len(old_ids))
        return UpsertResult(inserted=len(items) - replaced, replaced=replaced)

    def delete(self, keys: Sequence[str], *, before_write: Callable[[], None] | None = None) -> DeleteResult:
        """Remove items by key; durable when it returns. Unknown keys are reported missing.
        ``before_write``: as for ``upsert``."""
        self._check_open()
        unique = list(dict.fromkeys(checked_keys(keys)))
        if not unique:
            return DeleteResult(0, [])
        with self._write_lock:
            self._ready_to_write(before_write)
            with self._rw.write():
                found = self._commit_delete(unique)
            self._after_write(len(found))
        missing = [key for key in unique if key not in found]
        return DeleteResult(deleted=len(found), missing=missing)

    @contextlib.contextmanager
    def bulk(self) -> Iterator[IndexStore]:
        """Defer re-training, compaction and snapshots to the end of the block.

        For batch indexing: each upsert inside stays durable when it returns and searchable
        at once, but the index is re-trained (and snapshotted) only once, at the end,
        instead of at every growth step. Example::

            with store.bulk():
                for items, vectors in batches:
                    store.upsert(items, vectors)
        """
        self._check_open()
        with self._write_lock:
            self._bulk += 1
        try:
            yield self
        finally:
            with self._write_lock:
                self._bulk -= 1
                if not self._bulk and not self._closed:
                    self._after_write(0)

    def snapshot(self) -> None:
        """Save the FAISS index atomically and record which operations it holds.

        Cheap when nothing changed. The store snapshots itself every ``snapshot_every`` changed
        items and when it closes; this is for a caller that wants one now.
        """
        with self._write_lock:
            self._check_open()  # under the lock: a close between a check and the lock left its folder unlocked
            try:
                self._save_snapshot()
            except (OSError, RuntimeError, sqlite3.Error) as e:  # FAISS reports write errors as RuntimeError
                if _out_of_space(self.path, e):
                    raise ResourceExhaustedError(
                        f"the disk holding index store {self.path} is full; no snapshot was saved (every "
                        "write is in the database): free space and try again") from e
                raise

    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot pending changes (unless ``snapshot=False``) and release the store."""
        if self._closed:
            return
        self._stop_maintenance()
        with self._write_lock:
            if self._closed:  # a close in another thread got the lock first
                return
            try:
                if snapshot and hasattr(self, "_index"):
                    self._snapshot_if_possible()
            finally:
                with self._rw.write():  # searches under way finish first; later ones are refused
                    self._closed = True
                    with self._readers_lock:
                        for conn in list(self._readers):
                            conn.close()
                        self._readers.clear()
                    self._db.close()
                os.close(self._lock_fd)

    def _stop_maintenance(self) -> None:
        """Stop a background job at its next step and wait for it (not under the writer lock,
        which it takes to finish). Left running, it read the database to the end of the process:
        its connection kept the WAL file (198 MB after a soak's rebuilds), and the interpreter's
        exit ended it inside FAISS ("FATAL: exception not rethrown", an abort)."""
        self._closing = True
        job = self._maintenance
        if job is None or not job.is_alive() or job is threading.current_thread():
            return
        log.info("index store %s: stopping the background %s at its next step (waiting up to %d s)", self.path,
                 "rebuild" if self._rebuilding else "re-tuning", _MAINTENANCE_STOP_S)
        job.join(_MAINTENANCE_STOP_S)
        if job.is_alive():
            log.warning("index store %s: the background job did not stop within %d s; closing without it",
                        self.path, _MAINTENANCE_STOP_S)

    # -- write internals ------------------------------------------------------------------

    def _commit_upsert(self, items: list[Item], vecs: np.ndarray) -> list[int]:
        """One transaction: replace existing keys, insert rows, then apply to FAISS."""
        seq = self._seq + 1
        next_id = int(self._meta("next_id"))
        ids = np.arange(next_id, next_id + len(items), dtype=np.int64)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            existing = _ids_for_keys(db, [item.key for item in items])
            old_ids = list(existing.values())
            _delete_rows(db, old_ids, seq)
            db.executemany(
                "INSERT INTO items(id, key, label, attributes, seq) VALUES (?,?,?,?,?)",
                (
                    (int(i), it.key, it.label, _dump_attrs(it.attributes), seq)
                    for i, it in zip(ids, items, strict=True)
                ),
            )
            db.executemany(
                "INSERT INTO vectors(id, vector) VALUES (?,?)",
                ((int(i), v.tobytes()) for i, v in zip(ids, vecs, strict=True)),
            )
            db.executemany(
                "INSERT INTO contents(id, hash) VALUES (?,?)",
                ((int(i), it.content_hash) for i, it in zip(ids, items, strict=True) if it.content_hash),
            )
            db.executemany(
                "INSERT INTO item_attrs(name, value, id) VALUES (?,?,?)",
                (
                    (name, value, int(i))
                    for i, it in zip(ids, items, strict=True)
                    for name, value in it.attributes.items()
                ),
            )
            self._set_meta(seq=seq, next_id=next_id + len(items), updated=_now())
            db.execute("COMMIT")
        except BaseException as e:
            _rollback(db)
            _raise_if_cannot_write(self.path, e)
            raise
        self._seq = seq
        self._count += len(items) - len(old_ids)
        if self._metadata is not None:
            self._metadata.remove(old_ids)
            self._metadata.put(ids, items)
        self._apply(np.asarray(old_ids, np.int64), ids, vecs)
        return old_ids

    def _commit_delete(self, keys: list[str]) -> set[str]:
        seq = self._seq + 1
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            existing = _ids_for_keys(db, keys)
            if existing:
                _delete_rows(db, list(existing.values()), seq)
                self._set_meta(seq=seq, updated=_now())
            db.execute("COMMIT")
        except BaseException as e:
            _rollback(db)
            _raise_if_cannot_write(self.path, e)
            raise
        if existing:
            self._seq = seq
            self._count -= len(existing)
            if self._metadata is not None:
                self._metadata.remove(list(existing.values()))
            removed = np.fromiter(existing.values(), np.int64, len(existing))
            self._apply(removed, np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
        return set(existing)

    def _apply(self, removed: np.ndarray, added: np.ndarray, vectors: np.ndarray) -> None:
        """Mirror a committed change in FAISS; on failure rebuild from the database."""
        self._dirty = True
        try:
            self._index.remove(removed)
            self._index.add(added, vectors)
        except Exception:
            log.exception("FAISS update failed after a durable commit; rebuilding the index")
            self._index = self._build_index(self._index.factory)

    def _after_write(self, changed: int) -> None:
        """Re-train, compact or snapshot when due (writer lock held)."""
        self._pending += changed
        if self._bulk:
            return
        if self._rebuilding:
            # A background rebuild runs: its index is saved when it replaces this one. A snapshot
            # of this one (a 100k-item exact stand-in is 500 MB) would hold the writer lock for
            # seconds, and the next open replays what the last one lacks all the same.
            return
        try:
            busy = self._maintenance_base is not None  # a background re-tuning runs
            reason = "" if busy else self._rebuild_reason()
            retune = (not busy and not reason and not self._index.exact
                      and self._count >= 2 * max(self._tuned_for, _MIN_TUNE_ITEMS))
            if (reason or retune) and self.rebuild_in_background:
                if self._pending >= self.options.snapshot_every:
                    # Now, or not before the job ends: a server killed during jobs that each open
                    # started again replayed more at every open (5 kills: 1,277 -> 15,753 vectors).
                    self._snapshot_if_possible()
                self._start_background(reason)
            elif reason:
                self._rebuild(reason)
            elif retune:
                self._retune()
            elif self._pending >= self.options.snapshot_every:
                self._snapshot_if_possible()
        except Exception:  # (MemoryError too) the write is durable and searchable: it must not look failed
            log.exception("index store %s: maintenance after a write failed; searches go on with the index "
                          "as it was, and the next write tries again", self.path)

    def _rebuild_reason(self) -> str:
        """Why the index should be rebuilt now, or "" (writer lock held)."""
        n, built, growth = self._count, self._built_for, self.options.growth_factor
        target = self._target_factory(n)
        current = self._index.factory
        need = training_size(self.dim, target)
        if current == EXACT_FACTORY and target != EXACT_FACTORY:
            if n >= need:  # the exact stand-in can now give way to the real type
                return f"{n} items are enough to train {target}"
        elif (switch := self._next_factory()) != current:
            return f"{n} items call for {switch} instead of {current}"
        elif need and built and n >= growth * built:
            return f"collection grew from {built} to {n} items since training"
        if self._index.tombstone_ratio > self.options.compact_ratio:
            return f"{self._index.tombstones} tombstones ({self._index.tombstone_ratio:.0%})"
        return ""

    def _next_factory(self) -> str:
        """The type a rebuild builds: the one the size calls for, but a switch only when the
        collection has grown past what the index in use was chosen for, or shrunk a lot below it,
        so that one held at a boundary does not flap (a compaction keeps the type in use, unless
        too few items are left to train it: it would be built exact, then rebuilt at once)."""
        n, built, current = self._count, self._built_for, self._index.factory
        held = (current != EXACT_FACTORY and built / self.options.growth_factor < n < built
                and training_size(self.dim, current) <= n)
        return current if held else self._target_factory(n)

    def _target_factory(self, n: int) -> str:
        if self.index_type != AUTO:
            return self.index_type
        return choose_factory(n, self.dim, self.options)

    def _rebuild(self, reason: str) -> None:
        started = time.perf_counter()
        log.info("rebuilding the FAISS index over %d items (%s)", self._count, reason)
        # Readers keep searching the old index while the new one is built and tuned.
        new_index = self._build_index(self._next_factory())
        self._swap_in(new_index, self._tune(new_index), started, reason, self._count)

    def _swap_in(self, new_index: VectorIndex, knobs: SearchKnobs, started: float, reason: str,
                 chosen_for: int) -> None:
        """``chosen_for``: the items ``new_index``'s type was chosen for. Not the count at the
        swap: a background rebuild's catch-up may have deleted some since, and a type chosen
        for 19,976 items, taken as built for 19,912, was switched back at once, and again, for
        as long as writes held the collection at the boundary."""
        with self._rw.write():
            self._index, self._knobs = new_index, knobs
            self._built_for = self._tuned_for = chosen_for
            self._dirty = True
            self._rebuilding = ""  # in use now: info() said "rebuilding as" it while its snapshot was saved
        log.info(
            "rebuilt FAISS index as %s over %d items in %.1fs (%s); search defaults %s",
            new_index.factory, self._count, time.perf_counter() - started, reason, knobs,
        )
        self._snapshot_if_possible()

    def _start_background(self, reason: str) -> None:
        """Rebuild (for ``reason``), or re-tune when there is none, on a thread of its own from
        the database as it is now (writer lock held): its read transaction begins here, so a
        new index holds exactly the writes up to this seq, and the catch-up adds those after."""
        if self._closing:
            # A close waits only for the job it saw: one started by a write queued behind it ran on
            # after it returned (its connection kept the WAL file). The next open starts it again.
            return
        # The job's read transaction keeps the WAL from restarting while it runs: empty it first,
        # or what a crash left there stays and grows (5 kills during jobs: 68 MB -> 1.3 GB).
        try:
            _empty_wal(self._db)
        except sqlite3.Error as e:  # (a full disk) nothing is lost: the WAL stays as it is
            log.warning("index store %s: the WAL was not emptied before a background job (%s)", self.path, e)
        db = _connect(self.path / DATABASE, readonly=True)
        factory = self._next_factory() if reason else ""  # "": re-tune the index in use
        try:
            db.execute("BEGIN")
            db.execute("SELECT COUNT(*) FROM items").fetchone()  # the read snapshot starts here
            # A re-tuning searches a copy as of this snapshot: on the index in use, writes made
            # meanwhile (deletes, say) lowered the recall it measured against the snapshot's truth,
            # and the tuning settled for its cheapest setting (ef_search 16 at recall 0.91). The
            # copy holds up writes for a memory copy's time: 0.44 s for 100k x 1280 IVF-PQ + RFlat.
            retune = None if factory else (self._index, self._index.copy())
            self._maintenance = threading.Thread(
                target=self._background_maintenance, name="pictor-maintenance", daemon=True,
                args=(db, factory, reason, self._seq, int(self._meta("next_id")), self._count, retune))
            self._maintenance.start()
        except BaseException:
            db.close()
            raise
        # (the thread waits for the writer lock, held here, before it clears these)
        self._maintenance_base, self._rebuilding = self._seq, factory
        if factory:
            log.info("rebuilding the FAISS index as %s over %d items in the background (%s); writes go on "
                     "and searches use the index as it was until then", factory, self._count, reason)
        else:
            log.info("re-tuning the search defaults over %d items in the background; writes go on",
                     self._count)

    def _background_maintenance(self, db: sqlite3.Connection, factory: str, reason: str, base_seq: int,
                                base_next_id: int, count: int,
                                retune: tuple[VectorIndex, VectorIndex] | None) -> None:
        """Rebuild as ``factory``, or re-tune (``retune``: the index in use, and its copy as of
        ``db``'s snapshot, which is tuned)."""
        started = time.perf_counter()
        try:
            if retune is None:
                new_index = self._build_index(factory, db=db, count=count)
                self._raise_if_closing()
                knobs = self._tune(new_index, db=db, count=count)
            else:
                knobs = self._tune(retune[1], db=db, count=count)
            self._raise_if_closing()
            # Only this job clears its mark (below), and no other starts while it is set.
            with self._write_lock:
                if self._closed:  # the next open starts it again
                    return
                if retune is None:
                    # The writes made meanwhile: under the writer lock, so none is missed or applied twice.
                    self._catch_up(new_index, base_seq, below_id=base_next_id)
                    self._swap_in(new_index, knobs, started, reason, count)
                elif self._index is retune[0]:
                    self._set_knobs(knobs, count, started)
        except _Closing:
            log.info("index store %s: background %s stopped by the close; the next open starts it again",
                     self.path, "rebuild" if factory else "re-tuning")
        except Exception:
            log.exception("index store %s: background %s failed; searches go on with the index as it "
                          "was, and a later write tries again", self.path, "rebuild" if factory else "re-tuning")
        finally:
            db.close()
            with self._write_lock:
                self._maintenance_base, self._rebuilding = None, ""

    def _retune(self) -> None:
        """New search defaults for the grown collection (a fuller index needs a wider search
        for the same recall); readers keep the old ones until then."""
        self._set_knobs(self._tune(self._index), self._count, time.perf_counter())

    def _set_knobs(self, knobs: SearchKnobs, count: int, started: float) -> None:
        with self._rw.write():
            self._knobs, self._tuned_for, self._dirty = knobs, count, True
        log.info("re-tuned search defaults over %d items in %.1fs: %s", count, time.perf_counter() - started, knobs)
        self._snapshot_if_possible()

    def _build_index(self, factory: str, *, db: sqlite3.Connection | None = None,
                     count: int | None = None) -> VectorIndex:
        """A fresh index of type ``factory`` (exact while too few items to train it) over
        every stored vector, streamed in blocks (from ``db``, of ``count`` items: a background
        rebuild's snapshot of the database; default the store's own)."""
        db, count = db or self._db, self._count if count is None else count
        sample = None
        need = training_size(self.dim, factory)
        if need > count:
            factory, need = EXACT_FACTORY, 0
        if need:
            sample = self._sample_vectors(min(count, max(need, _TRAIN_SAMPLE)), db)
        self._raise_if_closing()
        index = VectorIndex.build(self.dim, factory, sample)
        for ids, vecs in _stream_vectors(db):
            self._raise_if_closing()
            index.add(ids, vecs)
        return index

    def _raise_if_closing(self) -> None:
        """A step of a background job: the store is being closed, stop here."""
        if self._closing and threading.current_thread() is self._maintenance:
            raise _Closing

    def _sample_ids(self, n: int, db: sqlite3.Connection) -> np.ndarray:
        """Ids of ``n`` stored items (all when fewer), sorted. Seeded: the same collection
        trains and tunes the same index, with the same search defaults, every time."""
        ids = np.fromiter((r[0] for r in db.execute("SELECT id FROM items ORDER BY id")), np.int64)
        if len(ids) > n:
            ids = np.random.default_rng(0).choice(ids, n, replace=False)
        return np.sort(ids)

    def _sample_vectors(self, n: int, db: sqlite3.Connection) -> np.ndarray:
        return np.concatenate([vecs for _, vecs in _vectors_of(db, self._sample_ids(n, db))])

    def _tune(self, index: VectorIndex, k: int = TUNED_K, n_queries: int = 500, *,
              db: sqlite3.Connection | None = None, count: int | None = None) -> SearchKnobs:
        """The fastest search defaults reaching ``target_recall`` on a held-out sample:
        stored items used as queries, each one's own entry left out of its results and of
        its exact ground truth (``db``, ``count``: as for ``_build_index``)."""
        db, count = db or self._db, self._count if count is None else count
        if index.exact or count <= k + 1:
            return SearchKnobs()
        qids = self._sample_ids(n_queries, db)
        blocks = list(_vectors_of(db, qids))
        qids = np.concatenate([ids for ids, _ in blocks])
        q = np.concatenate([vecs for _, vecs in blocks])
        truth_scores, truth = _exact_search(db, q, k + 1, None)
        self._raise_if_closing()  # (the exact scan is the long part: seconds at 1M items)
        ties = functools.partial(ties_with_kth, queries=q, truth=truth, truth_scores=truth_scores, k=k,
                                 exclude=qids, vectors_of=functools.partial(self._vectors_in_order, db=db))
        knobs, _recall = tune_knobs(index, q, truth, self.options.target_recall, k, exclude=qids, ties=ties,
                                    step=self._raise_if_closing)
        return knobs

    def _vectors_in_order(self, ids: np.ndarray, db: sqlite3.Connection) -> np.ndarray:
        """The stored vectors of ``ids`` (sorted, unique, all present), in that order."""
        out = np.empty((len(ids), self.dim), np.float32)
        for got, vecs in _vectors_of(db, ids):
            out[np.searchsorted(ids, got)] = vecs
        return out

    # -- snapshot and recovery ------------------------------------------------------------

    def _snapshot_if_possible(self) -> None:
        """A snapshot only bounds the replay at the next open: failing one (a full disk) must
        not fail the write that triggered it, which the database already holds."""
        try:
            self._save_snapshot()
        except (OSError, RuntimeError) as e:  # FAISS reports write errors as RuntimeError
            self._pending = 0  # the next try after as many changes again, not at each write to a full disk
            if gone := self.unavailable():  # the database went with the folder: nothing to replay
                log.error("index store %s: FAISS snapshot not saved: %s", self.path, gone)
            else:
                log.error("index store %s: FAISS snapshot not saved (%s); every write is in the "
                          "database, and the next open replays what the last snapshot lacks", self.path, e)

    def _save_snapshot(self) -> None:
        """Write the index to faiss-<seq>.index, then the manifest, then drop the old ones.

        Order matters for crashes: the manifest names a snapshot only once it is durable,
        and the op log is pruned only once the manifest naming the new snapshot is.
        """
        if not self._dirty and self._snapshot_seq == self._seq:
            return
        seq = self._seq
        name = f"{SNAPSHOT_PREFIX}{seq:012d}{SNAPSHOT_SUFFIX}"
        if name == (self._manifest.get("snapshot") or {}).get("file"):
            # The same operations in another index (rebuilt, re-tuned): a new name, so that the
            # file the manifest names is never replaced under it (a crash, or a backup copying
            # it, in between would find another file than the manifest's checksum says).
            name = f"{SNAPSHOT_PREFIX}{seq:012d}-{time.time_ns()}{SNAPSHOT_SUFFIX}"
        started = time.perf_counter()
        folder = self._folder()
        crc32 = self._index.save(folder / name)
        manifest = dict(self._manifest)
        manifest.update(
            factory=self._index.factory,
            built_for=self._built_for,
            tuned_for=self._tuned_for,
            search_defaults=asdict(self._knobs),
            count=self._count,
            updated=_now(),
            snapshot={"file": name, "seq": seq, "ntotal": self._index.ntotal, "crc32": crc32},
        )
        _write_json_atomic(folder / MANIFEST, manifest)
        self._manifest = manifest
        for old in folder.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"):
            if old.name != name:
                old.unlink()
        keep_after = seq if self._maintenance_base is None else min(seq, self._maintenance_base)
        try:  # (a background rebuild needs those after the seq it started from)
            with self._db:
                self._db.execute("DELETE FROM deletions WHERE seq <= ?", (keep_after,))
        except sqlite3.Error as e:  # a full disk: an open replays only those after the snapshot's seq
            log.warning("index store %s: deletions the snapshot holds not pruned (%s); the next snapshot "
                        "prunes them", self.path, e)
        self._snapshot_seq = seq
        self._pending = 0
        self._dirty = False
        log.debug("snapshot %s written in %.2fs", name, time.perf_counter() - started)

    def _recover(self) -> None:
        """Load the snapshot and replay what the database holds beyond it; rebuild if needed."""
        for stray in self.path.glob("*.tmp"):
            stray.unlink()  # a snapshot or manifest write cut short by a crash
        snap: dict[str, Any] = self._manifest.get("snapshot") or {}
        factory = str(self._manifest.get("factory", EXACT_FACTORY))
        index = self._load_snapshot(snap, factory)
        if index is None:
            self._index = self._build_index(factory)
            # The manifest's, as with a snapshot: the count would let a type held above it switch.
            self._built_for = self._built_for or self._count
            log.warning(
                "index store %s: no usable FAISS snapshot; rebuilt %s from %d stored vectors",
                self.path, factory, self._count,
            )
            self._dirty = True
            self._snapshot_if_possible()
            return
        self._index = index
        snap_seq = int(snap["seq"])
        added, removed = self._catch_up(self._index, snap_seq)  # (_consistent sets HNSW's tombstones)
        if not self._consistent():
            log.warning(
                "index store %s: FAISS snapshot disagrees with the database after replay; "
                "rebuilding from %d stored vectors", self.path, self._count,
            )
            self._index = self._build_index(factory)
            self._dirty = True
            self._snapshot_if_possible()
            return
        self._snapshot_seq = snap_seq
        if added or removed:
            log.warning(
                "index store %s: FAISS snapshot (seq %d) brought up to date with the database "
                "(seq %d): %d stored vectors added, %d deletions applied",
                self.path, snap_seq, self._seq, added, removed,
            )
            self._dirty = True
            self._pending = added + removed
        else:
            log.info("index store %s opened: %d items, %s", self.path, self._count, factory)

    def _load_snapshot(self, snap: dict[str, Any], factory: str) -> VectorIndex | None:
        if not snap:
            return None
        file = self.path / str(snap["file"])
        if int(snap["seq"]) > self._seq:
            log.warning("snapshot %s is newer than the database; ignoring it", file.name)
            return None
        try:  # stores written before snapshots had a checksum have none to check
            return VectorIndex.load(file, factory, crc32=snap.get("crc32"))
        except SnapshotMismatchError as e:
            log.warning("FAISS snapshot %s is damaged or another index's (%s)", file, e)
            return None
        except (RuntimeError, OSError) as e:
            log.warning("cannot read FAISS snapshot %s (%s)", file, e)
            return None

    def _catch_up(self, index: VectorIndex, since_seq: int, below_id: int | None = None) -> tuple[int, int]:
        """Apply to ``index`` the operations after ``since_seq``: deletions (of ids below
        ``below_id`` only, when given: the others were never in it), then surviving inserts."""
        removed = np.array(
            [r[0] for r in self._db.execute("SELECT id FROM deletions WHERE seq > ?", (since_seq,))],
            dtype=np.int64,
        )
        if below_id is not None:
            removed = removed[removed < below_id]
        index.remove(removed)
        added = 0
        for ids, vecs in _stream_vectors(self._db, min_seq=since_seq + 1):
            index.add(ids, vecs)
            added += len(ids)
        return added, len(removed)

    def _consistent(self) -> bool:
        """Whether the index holds exactly the live ids (plus tombstones); sets tombstones."""
        live = np.array([r[0] for r in self._db.execute("SELECT id FROM items")], np.int64)
        present = self._index.ids()
        if len(np.unique(present)) != len(present) or not np.isin(live, present).all():
            return False
        dead = np.setdiff1d(present, live, assume_unique=True)
        if len(dead) and self._index.removable:
            return False
        self._index.set_tombstones(dead)
        return True

    # -- search internals -----------------------------------------------------------------

    def _resolve_knobs(self, params: SearchParams | None, k: int) -> SearchKnobs:
        """The tuned defaults, widened for ``k`` results, where ``params`` sets no value."""
        params = params or SearchParams()
        for name, value in (("nprobe", params.nprobe), ("ef_search", params.ef_search)):
            if type(value) is not int:  # (1.5 or "x" would reach FAISS)
                raise InvalidRequestError(f"{name} must be a whole number, got {shown(value, 40)}")
            if not 0 <= value <= MAX_WIDTH:
                raise InvalidRequestError(
                    f"{name} must be between 0 (the index's tuned default) and {MAX_WIDTH}, got {value}"
                )
        defaults = self._knobs.for_k(k)
        if not (params.nprobe or params.ef_search):
            return defaults  # for k <= 10 the shared object: FAISS's params are then found by identity
        return SearchKnobs(
            nprobe=params.nprobe or defaults.nprobe,
            ef_search=params.ef_search or defaults.ef_search,
            k_factor=defaults.k_factor,
        )

    def _search_ids(
        self,
        q: np.ndarray,
        k: int,
        knobs: SearchKnobs,
        allowed: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, widened (then exact) for queries that came back short of k."""
        if allowed is not None and len(allowed) <= self.options.exact_filter_limit:
            return _exact_search(self._reader(), q, k, allowed)
        if allowed is not None and not self._index.exact:
            return self._filtered_search(q, k, knobs, allowed)
        scores, ids = self._index.search_checked(q, k, knobs, allowed)
        # FAISS pads missing results with -1 at the end: the k-th column tells all when
        # full (the common case, checked first, on one query as a Python int: numpy's scalar
        # maths costs more), else the column of what is available.
        full = ids.item(-1) >= 0 if len(ids) == 1 else (ids[:, k - 1] >= 0).all()
        if full:
            return scores, ids
        want = min(k, self._index.live if allowed is None else len(allowed))
        if want == 0 or (ids[:, want - 1] >= 0).all():
            return scores, ids
        short = np.flatnonzero(ids[:, want - 1] < 0)
        factor = 4
        while len(short) and factor <= 64 and not self._index.exact:
            s2, i2 = self._index.search_checked(q[short], k, knobs.scaled(factor), allowed)
            scores[short], ids[short] = s2, i2
            short = short[i2[:, want - 1] < 0]
            factor *= 4
        if len(short):
            s2, i2 = _exact_search(self._reader(), q[short], k, allowed)
            scores[short], ids[short] = s2, i2
        return scores, ids

    def _filtered_search(
        self, q: np.ndarray, k: int, knobs: SearchKnobs, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS passes over the items a filter excludes as it explores, and can stop among
        them (when they are the query's own neighbourhood) before finding the best allowed
        ones. So it starts wider by the inverse share of allowed items, then widens 4x at a
        time until two widths agree on a query's full top k (at most 64x); queries still
        short of k then get the exact scan."""
        widen = min(64, -(-self._index.live // len(allowed)))
        scores, ids = self._index.search_checked(q, k, knobs.scaled(widen) if widen > 1 else knobs, allowed)
        want = min(k, len(allowed))
        todo, factor = np.arange(len(q)), widen * 4
        while len(todo) and factor <= 64:
            s2, i2 = self._index.search_checked(q[todo], k, knobs.scaled(factor), allowed)
            settled = (np.sort(i2, axis=1) == np.sort(ids[todo], axis=1)).all(axis=1) & (i2[:, want - 1] >= 0)
            scores[todo], ids[todo] = s2, i2
            todo, factor = todo[~settled], factor * 4
        short = np.flatnonzero(ids[:, want - 1] < 0)
        if len(short):
            scores[short], ids[short] = _exact_search(self._reader(), q[short], k, allowed)
        return scores, ids

    # -- plumbing -------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (SQLite connections are not shared across threads).
        Refused once the folder is deleted, also where this thread opened one before: that one
        would still read the deleted file, so the answer had depended on the thread."""
        self._check_open()  # a reader that passed its own check as another thread closed the store
        folder = self._folder()  # (a readlink: a few microseconds)
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(folder / DATABASE, readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.add(conn)
        return conn

    def _folder(self) -> Path:
        """Where the store's folder is now: an operator may rename the folder of a served index
        and make a new one at its old path. Found (on Linux) through the lock file this store
        holds open; reading and writing at ``self.path`` had mixed the two stores' data."""
        try:
            lock = os.readlink(f"/proc/self/fd/{self._lock_fd}")
        except OSError:  # no /proc: not Linux
            return self.path
        if lock.endswith(" (deleted)"):
            gone = ServerUnavailableError(
                f"the folder of index store {self.path} was deleted while open: nothing can be written "
                "to it any more, nor read from its database (lookups by key, listing, filtered searches, "
                "Info); unfiltered searches by image or vector answer from memory (metadata held in memory, "
                "the default) until it closes. Restart on a restored copy (`pictor backup` makes one)")
            if not self._said_gone:  # once, as an error: each refused call is only an INFO line
                self._said_gone = True
                log.error("%s", gone)
            raise gone
        return Path(lock).parent

    def unavailable(self) -> str | None:
        """Why this store can take no more writes (its folder was deleted while open), or None:
        for a health check, which should fail then."""
        try:
            self._folder()
        except ServerUnavailableError as e:
            return str(e)
        return None

    def _ready_to_write(self, before_write: Callable[[], None] | None) -> None:
        """Before a write (writer lock held): the store may have been closed while this call
        waited for the lock, or its folder deleted while open, where an acknowledged write
        would be lost with the process; then the caller's own check."""
        self._check_open()
        self._folder()
        if before_write is not None:
            before_write()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError(f"index store {self.path} is closed")

    def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    def _meta(self, name: str, conn: sqlite3.Connection | None = None) -> Any:
        row = (conn or self._db).execute("SELECT value FROM meta WHERE name = ?", (name,))
        found = row.fetchone()
        if found is None:
            raise InvalidRequestError(f"{self.path / DATABASE} lacks metadata {name!r}")
        return found[0]

    def _set_meta(self, **values: Any) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", list(values.items())
        )


def _check_spec(spec: object, *, optional: bool) -> None:
    if not (isinstance(spec, ModelSpec) or (optional and spec is None)):
        raise InvalidRequestError(f"spec must be a ModelSpec (an Embedder's .spec){' or None' if optional else ''}, "
                                  f"got {type(spec).__name__}")


# -- choosing an index ----------------------------------------------------------------------


def choose_factory(n: int, dim: int, options: StoreOptions) -> str:
    """The FAISS factory string `auto` uses for ``n`` vectors of ``dim`` dimensions.

    Exact below ``options.exact_below``. Above: for small dims, HNSW on the full vectors
    when it fits the memory budget. For embedding-sized dims (bench/search.py measured
    this at 1M x 1280), an IVF over PCA-128 with 8-bit scalar codes, whose candidates a
    refine step re-ranks on 16-bit (or, on a tighter budget, 8-bit) copies of the full
    vectors; on the tightest budgets, fast-scan PQ codes without refinement (lower recall).
    """
    if n < options.exact_below:
        return EXACT_FACTORY
    budget = options.memory_budget_gb * 2**30
    if dim <= 256 and n * (4 * dim + 400) <= budget:
        return "HNSW32"
    # PCA-128, not 256: at 1M x 1280 it builds a quarter faster in 17% less memory at the
    # same recall, and single queries are as fast or faster (253 vs 364 us in one sweep:
    # each query reads half the PCA matrix and code bytes, from memory after the previous
    # scan). Re-ranking recovers what the truncation loses, at about one k_factor step
    # more: on 9,286 real EfficientNet embeddings (bench/pca_rerank.py) the top 60 by
    # PCA-128 hold 97.4% of the exact top 10, the top 40 by PCA-256 96.9%.
    reduced = min(dim, 128)
    pca = f"PCA{reduced}," if dim > reduced else ""
    # About 4 sqrt(n) lists: at 1M x 1280, 4096 lists reached recall@10 0.95 at ~2,700
    # single queries/s where 2048 lists gave ~2,200 (k-means on 2 cores: ~1 min more).
    # Never more lists than the collection can train (39 points per list).
    nlist = 2 ** min(round(math.log2(4 * math.sqrt(n))), int(math.log2(max(n // 39, 1))))
    ivf = f"{pca}IVF{nlist}_HNSW32"
    for refine, bytes_per_dim in (("SQfp16", 2), ("SQ8", 1)):
        if n * (reduced + bytes_per_dim * dim + 16) <= budget:
            return f"{ivf},SQ8,Refine({refine})"
    m = max(d for d in range(1, reduced // 2 + 1) if reduced % d == 0)
    return f"{ivf},PQ{m}x4fs"
