"""``backup_store`` (``pictor backup``): a consistent copy of an index store, taken beside a
server that writes to it."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from pathlib import Path

from pictor.core._store_files import DATABASE, MANIFEST, _out_of_space, _read_manifest, _write_json_atomic
from pictor.core._store_sql import _connect
from pictor.core.files import fsync_dir, remove_leftovers
from pictor.core.spec import ModelSpec
from pictor.core.whitening import WHITENING_FILE, PCAWhitening
from pictor.errors import InvalidRequestError, NotFoundError, ResourceExhaustedError


def backup_store(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Copy the store at ``path`` into the new folder ``dest``, consistently even while another
    process (a server) writes to it; returns how many items the copy holds.

    Copying the folder is not safe then: a copy taken during a write can hold a damaged
    database. So this copies the FAISS snapshot the manifest names (snapshot files are never
    changed once written), then the database through SQLite's online backup, which reads one
    committed state of it, at least as new as the snapshot: opening the copy brings the
    snapshot up to date with it, as after a crash. A PCA-whitened store's whitening file
    (written once, when the store is made) comes along."""
    src, out = Path(path), Path(dest)
    if not os.fspath(dest):  # Path("") is the current folder, which "exists"
        raise InvalidRequestError("the backup folder is empty; name a new folder")
    if not src.exists():
        raise NotFoundError(f"index directory {src} does not exist")
    if not (src / MANIFEST).is_file() or not (src / DATABASE).is_file():
        raise NotFoundError(f"no index store at {src} (no {MANIFEST} or {DATABASE})")
    if os.path.lexists(out):  # (a link to nowhere too: the copy would not go there)
        made = (" and holds an index store (a backup made before?)" if (out / MANIFEST).is_file()
                else f" (a link to {os.readlink(out)}, which does not exist)" if not out.exists() else "")
        raise InvalidRequestError(f"{out} exists{made}; back up into a new folder")
    if out.resolve().is_relative_to(src.resolve()):
        raise InvalidRequestError(f"{out} is inside the index {src}: back up somewhere else")
    # A whitened index whose whitening file is missing or another's cannot be served, nor could
    # its copy: refused before anything is copied, naming the index.
    PCAWhitening.load(src, ModelSpec.from_dict(_read_manifest(src / MANIFEST)["spec"]))
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if out.parent.is_dir():
        remove_leftovers(out.parent, f".{out.name}.partial-")  # of a backup killed while it copied
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise InvalidRequestError(f"cannot create the backup folder {out}: {e.strerror or e}") from e
    try:
        for _attempt in range(10):  # a newer snapshot may replace the one named meanwhile
            manifest = _read_manifest(src / MANIFEST)
            snapshot = manifest.get("snapshot")
            try:
                if snapshot is not None:
                    shutil.copyfile(src / snapshot["file"], partial / snapshot["file"])
                break
            except FileNotFoundError:
                continue
        else:
            manifest["snapshot"] = None  # the copy's index is rebuilt from its database
        if (src / WHITENING_FILE).is_file():
            shutil.copyfile(src / WHITENING_FILE, partial / WHITENING_FILE)
        with contextlib.closing(_open_source(src)) as source, \
                contextlib.closing(sqlite3.connect(partial / DATABASE)) as copy:
            source.backup(copy)
            count = int(copy.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        _write_json_atomic(partial / MANIFEST, manifest)
        for file in partial.iterdir():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        partial.rename(out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.lexists(out):
            raise InvalidRequestError(f"{out} was made while this backup copied (another backup into it?); "
                                      "nothing was kept: back up into a new folder") from e
        if isinstance(e, OSError | sqlite3.Error):
            error = ResourceExhaustedError if _out_of_space(out, e) else InvalidRequestError
            raise error(f"backing up {src} into {out} failed: {e}; nothing was kept") from e
        raise
    return count


def _open_source(src: Path) -> sqlite3.Connection:
    """The database to copy. On a read-only disk SQLite cannot make the shared-memory file a
    WAL database is read through; with no WAL file there (a store closed cleanly leaves none)
    every commit is in the database file itself, which is then read as immutable."""
    try:
        return _connect(src / DATABASE, readonly=True)
    except sqlite3.OperationalError:
        if os.access(src, os.W_OK) or (src / f"{DATABASE}-wal").exists():
            raise
        return sqlite3.connect(f"{(src / DATABASE).absolute().as_uri()}?immutable=1", uri=True)
