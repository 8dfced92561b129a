"""Files written whole or not at all: the store's snapshot and manifest, model files, caches;
and why a file would not load as tensors."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from pictor.errors import InvalidRequestError, PictorError, ResourceExhaustedError


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], *, durable: bool = True) -> None:
    """Write ``path`` through ``write(file)``: a reader, or a crash, sees the old file or the new
    one, never half of one.

    ``write`` fills a temporary file beside ``path`` that is then renamed over it. Its name ends
    in ``.tmp`` (the index store removes strays when it opens) and carries the process id, so
    concurrent writers never share one. ``durable``: also fsync the file and the directory, so
    the new file survives a power cut once this returns (the store's files need that; caches
    do not).
    """
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def remove_leftovers(folder: Path, prefix: str, suffix: str = "") -> None:
    """Remove the files or folders ``prefix<PID><suffix>`` in ``folder`` whose process is gone:
    what a killed writer left (a model file's temporary, a partial backup)."""
    for leftover in folder.glob(glob.escape(prefix) + "*" + suffix):
        pid = leftover.name[len(prefix):len(leftover.name) - len(suffix)]
        if pid.isdigit() and _process_gone(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive: another user's
        pass
    return False


def check_output_file(path: str | os.PathLike[str], flag: str,
                      inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = ()) -> None:
    """Refuse an output file that could not be written, before the work that fills it (making
    its missing parent folders), or that is one of the run's ``inputs`` ((what, path) pairs),
    or an image in an input folder: `pictor eval m.pt data --png m.pt` would replace the model
    with its plot."""
    if not os.fspath(path):  # Path("") is the current folder
        raise InvalidRequestError(f"{flag} is empty; name a file")
    p = Path(path)
    if p.is_dir():
        raise InvalidRequestError(f"{flag} {p}: is a folder; name a file")
    if p.exists() and not p.is_file():  # replacing a FIFO or a device with a file is no one's intent
        raise InvalidRequestError(f"{flag} {p}: exists and is not a regular file (a FIFO, socket or device)")
    from pictor.core.gallery import is_image_file  # (here: this module loads in the light client too)

    for what, given in inputs:
        if not (given and p.exists() and os.path.exists(given)):
            continue
        if os.path.samefile(p, given):
            raise InvalidRequestError(f"{flag} {p}: is {what}, which this run reads; writing it would replace "
                                      "it: name another file")
        if os.path.isdir(given) and is_image_file(p.name) and p.resolve().is_relative_to(Path(given).resolve()):
            raise InvalidRequestError(f"{flag} {p}: is a file in {what}, which this run reads; writing it would "
                                      "replace it: name another file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # ENOTDIR or EEXIST both mean a file where a folder should be: name it.
        blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror
        raise InvalidRequestError(f"{flag} {p}: cannot create its folder: {why}") from e
    # The temporary file write_atomic will write, made and removed: not os.access, which root
    # passes where no file can be made (/proc), nor any name (write_atomic's is longer).
    probe = _temporary_beside(p)
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise InvalidRequestError(f"{flag} {p}: cannot write in {p.parent}: {e.strerror or e}") from e


def write_failure(what: str, error: OSError, then: str) -> PictorError:
    """A failed write of ``what`` as one line; a full disk says so, and ``then`` what to do after
    freeing space."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(f"cannot write {what}: the disk is full; free space and {then}")
    return InvalidRequestError(f"cannot write {what}: {error.strerror or error}")


def why_not_tensors(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``error``, for a person.

    Not torch's own text: it advises ``weights_only=False``, which would run the file's code.
    """
    # torch says "Unsupported global: GLOBAL x" of a class, "unsupported GLOBAL x whose module
    # ... is blocked" of a function such as os.system.
    # A name is module.name: text that starts with "c" (pickle's GLOBAL opcode) reads as "orrupt.".
    pickled = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ((?:\w+\.)+\w+)", str(error))
    if pickled:
        return f"it holds a pickled {pickled[1]}, which is not loaded for safety"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return "a TorchScript archive (torch.jit.save), which holds code, not only tensors"
        return "a zip archive that is not a PyTorch file of plain tensors and values, or a damaged one"
    return "not a PyTorch file, or a damaged one"


def damaged_member(path: Path | IO[bytes]) -> str | None:
    """What is damaged in a zip archive (as PyTorch saves): a part whose bytes fail their
    checksum, or headers the zip reader cannot read; None when nothing is (also for a file that
    is not a zip). ``torch.load`` does not check the checksums, and loads a flipped byte as a
    changed weight."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError:
        raise  # unreadable: the caller says so
    except Exception as e:  # noqa: BLE001 - a damaged header fails the zip reader in many ways
        return f"its archive cannot be read: {e}"
    return None if bad is None else f"{bad} fails its checksum"


def content_hash(data: bytes) -> str:
    """A file's identity by content (sha256, hex): the trainer's embedding cache and the
    index's skipping of unchanged files key on it."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
