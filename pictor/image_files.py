"""Reading image files from disk, with errors that name the path: light (stdlib only), so the
client commands and the server side (decode, indexer, trainer) read files alike."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pictor.api import first_control_character
from pictor.errors import InvalidImageError, InvalidRequestError, NotFoundError

# No image within the pixel cap is this large (40 MP of 4-channel float32 is 640 MB): a larger
# file is refused by its size, before reading it whole (a 3 GB file took 3.9 GB of memory only
# to be found no image). What a request can carry is far less (the message limit, 64 MB).
MAX_IMAGE_FILE_BYTES = 1 << 30


def check_image_file(path: str | os.PathLike[str], *, folder_hint: str = "") -> Path:
    """``path``, once it is known to be a regular, non-empty file this process can open, of at
    most ``MAX_IMAGE_FILE_BYTES``: to refuse a list of files before the work on the first.
    NotFoundError for a missing file; ``folder_hint`` is said when it is a folder."""
    p = _path_of(path)
    with _errors_named(p):
        _check_stat(p, folder_hint)
        with open(p, "rb"):
            return p


def read_image_file(path: str | os.PathLike[str], *, folder_hint: str = "") -> bytes:
    """The bytes of an image file (refused as ``check_image_file`` refuses it)."""
    p = _path_of(path)
    with _errors_named(p):
        _check_stat(p, folder_hint)
        return p.read_bytes()


def _path_of(path: str | os.PathLike[str]) -> Path:
    if not os.fspath(path):  # pathlib reads "" as the current folder
        raise InvalidImageError("an empty path, not an image file")
    return Path(path)


def _check_stat(p: Path, folder_hint: str) -> None:
    st = p.stat()
    if stat.S_ISDIR(st.st_mode):
        raise InvalidImageError(f"{p}: a folder, not an image file{f' ({folder_hint})' if folder_hint else ''}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device named like an image would block or never end
        raise InvalidImageError(f"{p}: not a regular file (a FIFO, socket or device)")
    if not st.st_size:  # (an Upsert item with no image bytes would be "neither image nor vector")
        raise InvalidImageError(f"{p}: an empty file (0 bytes), not an image")
    if st.st_size > MAX_IMAGE_FILE_BYTES:
        raise InvalidImageError(f"{p}: a file of {st.st_size / 2**30:.2f} GB, larger than any image Pictor "
                                f"reads ({MAX_IMAGE_FILE_BYTES / 2**30:.0f} GB); not read")


@contextlib.contextmanager
def _errors_named(p: Path) -> Iterator[None]:
    """The OS's errors on ``p`` as Pictor's, naming it."""
    try:
        yield
    except InvalidImageError:
        raise  # a ValueError too, but already says what is wrong
    except FileNotFoundError as e:
        raise NotFoundError(f"{p}: no such file") from e
    except OSError as e:
        raise InvalidImageError(f"{p}: cannot read: {e.strerror or e}") from e
    except ValueError as e:  # a NUL byte in the path
        raise InvalidImageError(f"{str(p)!r}: not a usable path: {e}") from e


def path_text(text: str | os.PathLike[str]) -> str:
    """A path (or a message naming one) as valid Unicode: bytes of a file name that are not
    UTF-8, which Python keeps as lone surrogates that strict JSON parsers refuse, as \\xNN. Text
    that also holds another lone surrogate (no file name gives one, a JSONL manifest may) has
    every surrogate written as \\udNNN."""
    text = os.fspath(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str | os.PathLike[str]) -> str:
    """A path (or a message naming one) for a line of a terminal or a log: as ``path_text``, and
    a line break or other control character of a file name escaped (``\\n``, ``\\x1b``), so
    that it can neither split its line nor forge another."""
    text = path_text(text)
    if first_control_character(text) is None:
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if first_control_character(ch) else ch
                   for ch in text)


def path_key(path: str | os.PathLike[str]) -> str:
    """The key an image file is indexed under (`pictor index`, `pictor add`): its path as
    given, normalised (``./a//b.jpg`` -> ``a/b.jpg``)."""
    return Path(path).as_posix()


def check_key_text(key: str) -> None:
    """Refuse a key that is not text: a file name that is not UTF-8 (from an old archive, say),
    which Python keeps as lone surrogates, cannot be stored or sent as one."""
    if path_text(key) == key:
        return
    parts = Path(key).parts
    bad = next(i for i, part in enumerate(parts) if path_text(part) != part)
    # A folder's name is said as such: all its files would otherwise be blamed, one by one.
    what = "the file name" if bad == len(parts) - 1 else f"the name of its folder {path_text(parts[bad])}"
    raise InvalidRequestError(f"{path_text(key)}: {what} is not UTF-8 text, which a key must be; rename the "
                              + ("file" if bad == len(parts) - 1 else "folder"))
