"""An index store's folder: its file names and format version, the manifest, the lock that
keeps a second process out, and disk errors (a full disk, a read-only file) said plainly.
The folder's layout is described in ``pictor.core.store``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pictor.core.faiss_index import SearchKnobs
from pictor.core.files import fsync_dir, write_atomic
from pictor.core.spec import ModelSpec
from pictor.core.store_types import StoreOptions
from pictor.errors import InvalidRequestError, ResourceExhaustedError, shown

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "metadata.sqlite"
LOCK_FILE = "LOCK"
WHITENING_FILE = "whitening.npz"  # in an index directory built with --pca-whiten
SNAPSHOT_PREFIX = "faiss-"
SNAPSHOT_SUFFIX = ".index"
# What to do about a damaged store file (the database holds every acknowledged write).
RESTORE_OR_REBUILD = ("restore it from a backup, or build the index again with `pictor index` "
                      "into another --out (or after deleting this folder)")


# -- files and locks ------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked: a damaged one is named here, not by a traceback later."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"{path} is unreadable ({e}); {RESTORE_OR_REBUILD}") from e
    if not isinstance(manifest, dict):
        raise InvalidRequestError(f"{path} is damaged: not a JSON object; {RESTORE_OR_REBUILD}")
    if "format" not in manifest:
        raise InvalidRequestError(f"{path} is damaged: it names no store format; {RESTORE_OR_REBUILD}")
    if manifest.get("format") != FORMAT_VERSION:
        raise InvalidRequestError(
            f"{path.parent} has store format {manifest.get('format')!r}; this Pictor reads "
            f"format {FORMAT_VERSION}"
        )
    try:
        spec = ModelSpec.from_dict(manifest["spec"])
        dim = int(manifest["dim"])
        if not isinstance(manifest["index_type"], str):
            raise TypeError("index_type is not a string")
        StoreOptions(**manifest.get("options", {}))
        SearchKnobs(**manifest.get("search_defaults", {}))
        for name in ("built_for", "tuned_for"):
            if not isinstance(manifest.get(name, 0), int):
                raise TypeError(f"{name} is not an integer")
        snapshot = manifest.get("snapshot")
        if snapshot is not None and not (isinstance(snapshot, dict) and isinstance(snapshot.get("file"), str)
                                         and isinstance(snapshot.get("seq"), int)
                                         and isinstance(snapshot.get("crc32", 0), int)):
            raise ValueError(f"snapshot entry {shown(snapshot)} lacks a file name, an integer seq "
                             "or an integer checksum")
    except (KeyError, TypeError, ValueError) as e:  # (InvalidRequestError, of StoreOptions, is a ValueError)
        raise InvalidRequestError(f"{path} is damaged ({type(e).__name__}: {e}); {RESTORE_OR_REBUILD}") from e
    if dim != spec.dim:
        raise InvalidRequestError(f"{path} is damaged: dim {dim}, but its model's is {spec.dim}; "
                                  f"{RESTORE_OR_REBUILD}")
    return manifest


def _raise_if_cannot_open(root: Path, error: BaseException) -> None:
    """Say why a store does not open: a full disk, or a database file that is not one or was
    cut short (SQLite's own words are vague)."""
    if _out_of_space(root, error):
        raise ResourceExhaustedError(
            f"the disk holding index store {root} is full, and opening it writes beside its "
            "database (SQLite's -wal and -shm files): free space and open it again"
        ) from error
    code = _sqlite_code(error)
    if code is not None and code & 0xFF == sqlite3.SQLITE_READONLY:  # e.g. no -wal file may be made
        raise _cannot_write(root, str(error)) from error
    # (A row that breaks the schema, a NULL label say, fails as a TypeError when loaded: a
    # copy taken while a server wrote had one.)
    if isinstance(error, sqlite3.DatabaseError | TypeError):
        raise InvalidRequestError(
            f"{root / DATABASE} is damaged or not a Pictor database ({error}); {RESTORE_OR_REBUILD}"
        ) from error


def _check_writable(root: Path, db: sqlite3.Connection) -> None:
    """Refuse a database file that takes no writes (read-only to this user) when opened, not
    at its first Upsert: SQLite opens such a file read-only without a word."""
    try:
        db.execute("BEGIN IMMEDIATE")  # (succeeds on such a file: only a page written fails)
        db.execute("UPDATE meta SET value = value WHERE name = 'seq'")
    except sqlite3.OperationalError as e:
        if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
            raise
        raise _cannot_write(root, f"its {DATABASE} is read-only ({e})") from e
    finally:
        _rollback(db)


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:  # SQLite itself rolls back on some errors (a full disk)
        db.execute("ROLLBACK")


# Free bytes under which SQLite's I/O errors are taken for a full disk: opening a database in
# WAL mode writes its -wal and -shm files, and on a full disk that fails as "disk I/O error".
_LOW_SPACE_BYTES = 1 << 20


def _sqlite_code(error: BaseException) -> int | None:
    """SQLite's extended result code of ``error``; None for an error that is not SQLite's."""
    return getattr(error, "sqlite_errorcode", None) if isinstance(error, sqlite3.Error) else None


def _out_of_space(root: Path, error: BaseException) -> bool:
    """Whether ``error`` comes from the disk holding ``root`` being full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    code = _sqlite_code(error)
    if code == sqlite3.SQLITE_FULL:
        return True
    # (FAISS reports a failed write as a RuntimeError, and SQLite I/O errors name no cause.)
    if isinstance(error, RuntimeError) or (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(root if root.exists() else root.parent).free < _LOW_SPACE_BYTES
    return False


def _raise_if_cannot_write(root: Path, error: BaseException) -> None:
    """A write that the disk refused, said plainly (SQLite's "disk I/O error" names no cause)."""
    if _out_of_space(root, error):
        raise ResourceExhaustedError(
            f"the disk holding index store {root} is full; this write was not applied (earlier "
            "ones are kept): free space and try again"
        ) from error
    code = _sqlite_code(error)
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:  # with space left on the disk
        raise ResourceExhaustedError(
            f"could not write to index store {root} ({error}): a disk quota, a file size limit "
            "(ulimit -f) or a failing disk; this write was not applied (earlier ones are kept)"
        ) from error


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def _cannot_write(root: Path, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"cannot open index store {root} for writing: {why}; an index is opened for writing even "
        "to serve it (it takes a lock, and repairs and snapshots its FAISS index): make it writable, "
        "or serve a writable copy of a read-only one (`pictor backup INDEX COPY` makes one)")


def _refuse_read_only_database(root: Path) -> None:
    """Refuse a database that this user cannot write, or whose -wal or -shm file they cannot,
    before SQLite opens it: it would open it read-only and make -wal and -shm files as read-only
    as the database, which kept the store refused after the database was made writable."""
    # (Exists tested after: a -wal file that a closing reader removes meanwhile is not read-only.)
    names = [name for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm")
             if not os.access(root / name, os.W_OK) and (root / name).exists()]
    if names:
        raise _cannot_write(root, f"its {' and '.join(names)} {'is' if len(names) == 1 else 'are'} read-only")


def _lock_directory(root: Path) -> int:
    """Hold an exclusive lock on the store so a second process cannot write it too."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only disk or folder: the store writes on every open
        raise _cannot_write(root, str(e.strerror)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise InvalidRequestError(
            f"index store {root} is open in another process; stop it first (while `pictor serve` has it: "
            "`pictor add` writes through the server, `pictor backup` copies it to read)"
        ) from e
    return fd


# What a store's creation writes before its manifest, which marks the store made.
_CREATION_FILES = {LOCK_FILE, DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal", WHITENING_FILE}


def half_made_store(root: Path) -> bool:
    """Whether ``root`` holds what a store's creation writes before its manifest, and nothing
    else: a creation cut off (killed), with no items in it (they come after the manifest)."""
    if not root.is_dir() or (root / MANIFEST).exists():
        return False
    names = [p.name for p in root.iterdir()]
    return bool(names) and all(name in _CREATION_FILES or name.endswith(".tmp") for name in names)


def _empty_folder(root: Path, *, remove: bool) -> None:
    """Delete the files in ``root`` (and ``root`` itself when ``remove``), as far as possible."""
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            entry.unlink(missing_ok=True)
        if remove:
            root.rmdir()


def make_store_dir(root: Path) -> None:
    """The folder a new store goes in (with its parents), or an error that names the cause."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)  # the new folder's entry: a power cut must not lose acknowledged writes
    except OSError as e:
        raise InvalidRequestError(f"cannot create the index folder {root}: {e.strerror or e}") from e
