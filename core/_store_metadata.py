"""The metadata of search hits, joined with FAISS's ids: from a table kept in memory
(``_ItemMetadata``, unless ``StoreOptions.metadata_in_memory`` is off), or by one SQLite query.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from pictor.core._store_sql import _SQL_CHUNK, _select_in
from pictor.core.store_types import Hits, Item, _dump_attrs


def _hits_from_sqlite(conn: sqlite3.Connection, scores: np.ndarray, ids: np.ndarray) -> list[Hits]:
    """Join FAISS results with their metadata in one SQLite query (one per 4096 ids)."""
    rows = ids.tolist()
    wanted = sorted({i for row in rows for i in row if i >= 0})
    sql = "SELECT id, key, label, attributes FROM items WHERE id IN ({marks})"
    meta: dict[int, tuple[str, str, str]] = {r[0]: r[1:] for rows in _select_in(conn, sql, wanted) for r in rows}
    results = []
    for row_s, row_i in zip(scores.tolist(), rows, strict=True):
        kept = [j for j, i in enumerate(row_i) if i in meta]
        results.append(Hits([meta[row_i[j]] for j in kept], [row_s[j] for j in kept]))
    return results


class _ItemMetadata:
    """(key, label, attributes JSON or "") of every live item, in a numpy object array
    indexed by id (None where no live item has that id).

    The search path joins FAISS ids with their metadata by ``take``: one C loop for all
    hits, whose memory accesses overlap, where a dict lookup per hit waits on each of several
    in turn (after the FAISS scan has evicted the caches, each costs a trip to memory).
    Memory: 8 bytes per id ever assigned (ids are never reused, so replaced items count
    too) plus a tuple and the strings per live item.
    """

    def __init__(self) -> None:
        self.rows = np.full(1, None, object)  # id 0 is never assigned

    @classmethod
    def load(cls, db: sqlite3.Connection) -> _ItemMetadata:
        table = cls()
        cursor = db.execute("SELECT id, key, label, attributes FROM items ORDER BY id")
        while rows := cursor.fetchmany(_SQL_CHUNK * 16):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            table._reserve(int(ids[-1]))
            table.rows[ids] = _tuples((r[1], sys.intern(r[2]), r[3]) for r in rows)
        return table

    def put(self, ids: np.ndarray, items: Sequence[Item]) -> None:
        if not len(ids):
            return
        self._reserve(int(ids.max()))
        # Labels repeat across many items: share one string object per label.
        self.rows[ids] = _tuples((it.key, sys.intern(it.label), _dump_attrs(it.attributes)) for it in items)

    def remove(self, ids: Sequence[int]) -> None:
        if len(ids):
            self.rows[np.asarray(ids, np.int64)] = None

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hits]:
        """The hits of FAISS results (-1 ids, which FAISS pads with, are skipped)."""
        if len(ids) == 1 and ids.item(-1) >= 0:  # one query with all k found: a server's case
            (rows,) = self.rows.take(ids).tolist()
            if None not in rows:
                return [Hits(rows, scores[0].tolist())]
        results = []
        # Whole-array C calls, then per query only what cannot be: this runs right after the
        # FAISS scan has evicted the caches, where every Python step costs several times more.
        for rows, row_ids, row_scores in zip(
            self.rows.take(ids).tolist(), ids.tolist(), scores.tolist(), strict=True
        ):
            # Short of k (FAISS pads the end with -1, and row -1 is the table's last) or an
            # id without a live item: keep the others. Rare; the common case stays in C.
            if row_ids[-1] < 0 or None in rows:
                kept = [j for j, (i, m) in enumerate(zip(row_ids, rows, strict=True))
                        if i >= 0 and m is not None]
                rows, row_scores = [rows[j] for j in kept], [row_scores[j] for j in kept]
            results.append(Hits(rows, row_scores))
        return results

    def _reserve(self, max_id: int) -> None:
        size = len(self.rows)
        if max_id >= size:
            grown = np.full(max(max_id + 1, size * 2), None, object)  # doubling: amortised
            grown[:size] = self.rows
            self.rows = grown


def _tuples(values: Iterable[tuple[str, str, str]]) -> np.ndarray:
    """A 1-D object array of tuples (a list would be read as a 2-D array of strings)."""
    return np.fromiter(values, dtype=object)
