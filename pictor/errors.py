"""Typed domain errors, shared by every part of Pictor.

The server maps them to gRPC status codes in one table (``pictor.status``); the client
maps status codes back. They carry messages meant for the person who sent the request.
"""

from __future__ import annotations


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut after ``limit`` characters with a marker that says so
    (a key of 4,096 characters would bury the message; cut silently, it would read as whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def notes_text(error: BaseException) -> str:
    """What an error's notes (``add_note``) add to its message, each after "; ": what was done
    before it failed."""
    return "".join(f"; {note}" for note in getattr(error, "__notes__", ()))


class PictorError(Exception):
    """Base class of every error Pictor raises on purpose."""


class InvalidRequestError(PictorError, ValueError):
    """A request whose arguments are wrong (missing query, k out of range, bad vector, ...)."""


class InvalidImageError(InvalidRequestError):
    """Image bytes that cannot be used: corrupt, truncated, a disallowed format, or too large.

    A kind of ``InvalidRequestError``: both are INVALID_ARGUMENT, and the client, which sees
    only the status code, raises ``InvalidRequestError`` for either."""


class NotFoundError(PictorError, KeyError):
    """A key, file or model that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class IncompatibleModelError(PictorError):
    """Vectors, queries, heads or indexes from a different embedding space."""


class UnauthenticatedError(PictorError):
    """The server takes calls only with its token (``PICTOR_TOKEN``), and this one carried none
    or another."""


class WeightsUnavailableError(PictorError):
    """Pretrained weights that are neither cached nor downloadable; says how to provide them,
    and which other weights would do (``others``). ``needed`` is the message without them, for
    a caller that needs these very weights (an index's, a model file's)."""

    def __init__(self, needed: str, others: str = "") -> None:
        super().__init__(needed + others)
        self.needed = needed


class ResourceExhaustedError(PictorError):
    """The server ran out of something: disk space under the index (the write was not
    applied), handler threads (``ServerBusyError``), or a request over its message size limit."""


class ServerBusyError(ResourceExhaustedError):
    """The server refused the call as busy, nothing done: the threads it would take were held
    (by calls that wait for the model or a write, or by streams). Worth sending again later;
    PictorClient has already resent it (``max_attempts``)."""


class MissingExtraError(PictorError, ImportError):
    """A server-side feature used from the light client install."""


def require_server_extra(feature: str) -> None:
    """Fail with a clear message when the heavy dependencies of ``feature`` are missing."""
    import importlib.util

    missing = [m for m in ("torch", "torchvision", "timm", "faiss") if not importlib.util.find_spec(m)]
    if missing:
        raise MissingExtraError(
            f"`{feature}` needs the server extra (missing: {', '.join(missing)}). "
            "Install it from the Pictor checkout with: pip install '.[server]' (the `pictor` on "
            "PyPI is another project)"
        )


class ServerUnavailableError(PictorError, ConnectionError):
    """The server could not be reached, the call was cut off before its answer (the connection
    lost, the client closed by another thread, the server stopped with the call open), or it
    did not answer before the deadline; or it answered that it cannot serve (``server_said``:
    the folder of its index was deleted while open)."""

    server_said: bool = False  # the server itself ended the call: it is up, and says why


class DeadlineExceededError(ServerUnavailableError, TimeoutError):
    """The call's deadline passed before the answer: the client gets this, and the server stops
    work for a caller that has gone. Also a ``TimeoutError``, so ``except TimeoutError`` catches
    a client's timeout."""
