"""The SQLite side of an index store: connections, the schema, queries by key or id a chunk
at a time, vectors streamed in blocks, filters as SQL, and exact search over stored vectors.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from pictor.core._store_files import FORMAT_VERSION
from pictor.core.spec import ModelSpec
from pictor.core.store_types import Filter

_SQL_CHUNK = 4096  # ids per `IN (...)` query and vectors per streamed block


# -- SQLite helpers -------------------------------------------------------------------------


_BUSY_TIMEOUT_S = 30  # how long a statement waits for another connection's lock
WAL_KEEP_BYTES = 64 << 20  # what a WAL file is cut back to once a checkpoint resets it


class _Connection(sqlite3.Connection):
    """A connection a ``weakref.WeakSet`` can hold (sqlite3's own cannot be weakly referenced)."""


def _empty_wal(db: sqlite3.Connection) -> None:
    """Copy the WAL into the database and cut it to nothing, at once: while another connection
    reads (a search, a backup), as much as it can without waiting for it."""
    db.execute("PRAGMA busy_timeout=0")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S,
                           factory=_Connection)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when COMMIT returns
    # A checkpoint that resets the WAL cuts the file back to this; else it keeps the size of its
    # largest burst (198 MB after a soak's background rebuilds held readers open for 40 s).
    conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
        # Search looks up metadata of random ids: keep more of the narrow items table cached.
        conn.execute("PRAGMA cache_size=-65536")
    return conn


# Items' content hashes (only those that have one), apart from the narrow items table. Stores
# made before it existed get it when opened.
_CONTENTS_TABLE = "CREATE TABLE IF NOT EXISTS contents(id INTEGER PRIMARY KEY, hash TEXT NOT NULL)"
_CONTENTS_INDEX = "CREATE INDEX IF NOT EXISTS contents_hash ON contents(hash)"  # vector_of_content


def _create_schema(db: sqlite3.Connection, spec: ModelSpec, now: str) -> None:
    with db:
        db.executescript(
            """
            CREATE TABLE meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID;
            -- Narrow rows, so the metadata lookup of a search touches few pages.
            CREATE TABLE items(
                id INTEGER PRIMARY KEY,     -- the FAISS id; never reused
                key TEXT NOT NULL UNIQUE,
                label TEXT NOT NULL,
                attributes TEXT NOT NULL,   -- JSON object of strings, "" when empty
                seq INTEGER NOT NULL        -- operation that wrote it
            );
            CREATE TABLE vectors(
                id INTEGER PRIMARY KEY,     -- same id as items
                vector BLOB NOT NULL        -- float32, L2-normalised
            );
            CREATE INDEX items_label ON items(label);
            CREATE INDEX items_seq ON items(seq);
            CREATE TABLE item_attrs(
                name TEXT NOT NULL, value TEXT NOT NULL, id INTEGER NOT NULL,
                PRIMARY KEY(name, value, id)
            ) WITHOUT ROWID;
            CREATE INDEX item_attrs_id ON item_attrs(id);
            -- ids removed by operations the FAISS snapshot may not contain yet
            CREATE TABLE deletions(id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
            """
        )
        db.execute(_CONTENTS_TABLE)
        db.execute(_CONTENTS_INDEX)
        db.executemany(
            "INSERT INTO meta(name, value) VALUES (?, ?)",
            [
                ("format", FORMAT_VERSION),
                ("spec", json.dumps(spec.to_dict(), sort_keys=True)),
                ("dim", spec.dim),
                ("seq", 0),
                ("next_id", 1),
                ("created", now),
                ("updated", now),
            ],
        )


def _select_in(db: sqlite3.Connection, sql: str, values: Sequence[Any]) -> Iterator[list[Any]]:
    """The rows of ``sql``, whose ``IN ({marks})`` takes ``values``, a chunk of them at a time:
    SQLite caps a statement's parameters."""
    for start in range(0, len(values), _SQL_CHUNK):
        chunk = list(values[start : start + _SQL_CHUNK])
        yield db.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()


def _ids_for_keys(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, int]:
    sql = "SELECT key, id FROM items WHERE key IN ({marks})"
    return {key: item_id for rows in _select_in(db, sql, keys) for key, item_id in rows}


def _rows_for_keys(db: sqlite3.Connection, keys: Sequence[str], *, vectors: bool) -> dict[str, tuple[Any, ...]]:
    """key -> (label, attributes JSON, content hash or ""[, vector bytes]) of the keys held."""
    vector, join = (", v.vector", "JOIN vectors v ON v.id = i.id") if vectors else ("", "")
    sql = (f"SELECT i.key, i.label, i.attributes, COALESCE(c.hash, ''){vector} FROM items i "
           f"LEFT JOIN contents c ON c.id = i.id {join} WHERE i.key IN ({{marks}})")
    return {key: tuple(rest) for rows in _select_in(db, sql, keys) for key, *rest in rows}


def _delete_rows(db: sqlite3.Connection, ids: Sequence[int], seq: int) -> None:
    for start in range(0, len(ids), _SQL_CHUNK):
        chunk = [(int(i),) for i in ids[start : start + _SQL_CHUNK]]
        db.executemany("DELETE FROM items WHERE id = ?", chunk)
        db.executemany("DELETE FROM vectors WHERE id = ?", chunk)
        db.executemany("DELETE FROM item_attrs WHERE id = ?", chunk)
        db.executemany("DELETE FROM contents WHERE id = ?", chunk)
        db.executemany(
            "INSERT OR REPLACE INTO deletions(id, seq) VALUES (?, ?)",
            [(i, seq) for (i,) in chunk],
        )


def _stream_vectors(
    db: sqlite3.Connection, *, min_seq: int = 0, block: int = _SQL_CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) blocks of every stored item with ``seq >= min_seq``, in id order."""
    if min_seq <= 0:
        cursor = db.execute("SELECT id, vector FROM vectors ORDER BY id")
    else:
        cursor = db.execute(
            "SELECT id, vector FROM vectors WHERE id IN (SELECT id FROM items WHERE seq >= ?) "
            "ORDER BY id",
            (min_seq,),
        )
    while rows := cursor.fetchmany(block):
        yield _block(rows)


def _block(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of ``(id, vector)`` rows."""
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return ids, np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1)


# -- filters --------------------------------------------------------------------------------


def _match_ids(conn: sqlite3.Connection, flt: Filter) -> np.ndarray:
    """Sorted ids of the items a filter admits."""
    sql, args = _ids_query(_filter_parts(flt))
    return np.fromiter((r[0] for r in conn.execute(sql + " ORDER BY 1", args)), np.int64)


class _FilterPart(NamedTuple):
    """One test of a filter, as a query of the ids it admits and as a condition on a row of
    items; both take ``args``."""

    ids: str
    row: str
    args: list[Any]


def _filter_parts(flt: Filter) -> list[_FilterPart]:
    """The tests a (non-empty) filter makes; an item must pass all of them."""
    parts = []
    if flt.labels:
        # One JSON parameter, not one per label: SQLite caps a statement's parameters.
        labels = "label IN (SELECT value FROM json_each(?))"
        # The row test's unary + keeps SQLite from the label index: the rows in key order.
        parts.append(_FilterPart(f"SELECT id FROM items WHERE {labels}", f"+{labels}",
                                 [json.dumps(list(dict.fromkeys(flt.labels)))]))
    for name, value in flt.attributes.items():
        parts.append(_FilterPart(
            "SELECT id FROM item_attrs WHERE name = ? AND value = ?",
            "EXISTS (SELECT 1 FROM item_attrs a WHERE a.name = ? AND a.value = ? AND a.id = items.id)",
            [name, value]))
    return parts


def _ids_query(parts: list[_FilterPart]) -> tuple[str, list[Any]]:
    """A query of the ids of the items that pass every part, with its parameters."""
    return " INTERSECT ".join(p.ids for p in parts), [a for p in parts for a in p.args]


def _admitted_condition(
    conn: sqlite3.Connection, parts: list[_FilterPart], limit: int, count: int
) -> tuple[str, list[Any]]:
    """A condition on items rows for a page of ``limit`` in key order, with its parameters.

    Testing each row costs about ``limit * count / matches`` rows a page (a whole listing reads
    the table once); gathering the matching ids costs ``matches`` a page, but finds a rare
    filter's page without reading the table. Ids are gathered when some part admits fewer
    items than where the two cost the same (counted through the indexes, up to there)."""
    crossover = int(math.sqrt(4 * limit * count))
    for part in parts:
        (matches,) = conn.execute(f"SELECT count(*) FROM ({part.ids} LIMIT ?)", [*part.args, crossover]).fetchone()
        if matches < crossover:
            ids, args = _ids_query(parts)
            return f"id IN ({ids})", args
    return " AND ".join(p.row for p in parts), [a for p in parts for a in p.args]


# -- exact search ---------------------------------------------------------------------------


def _exact_search(
    conn: sqlite3.Connection, q: np.ndarray, k: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over stored vectors (all, or the ``allowed`` ids), in blocks; id -1 pads
    results short of ``k``."""
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for ids, vecs in _vectors_of(conn, allowed):
        scores, rows = faiss.knn(q, vecs, min(k, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[rows])
    heap.finalize()
    return heap.D, heap.I


def _vectors_of(
    conn: sqlite3.Connection, ids: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if ids is None:
        yield from _stream_vectors(conn)
        return
    for rows in _select_in(conn, "SELECT id, vector FROM vectors WHERE id IN ({marks})", ids.tolist()):
        if rows:
            yield _block(rows)
