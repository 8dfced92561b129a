"""The one table between Pictor's domain errors and gRPC status codes.

The server turns a raised ``PictorError`` into its status code (``pictor.server.errors``);
the client turns a status code back into the error type of that code (``error_from_status``;
an ``InvalidImageError`` comes back as its base, ``InvalidRequestError``: both are
INVALID_ARGUMENT).
"""

from __future__ import annotations

import grpc

from pictor.errors import (
    DeadlineExceededError,
    IncompatibleModelError,
    InvalidImageError,
    InvalidRequestError,
    NotFoundError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    ServerUnavailableError,
    UnauthenticatedError,
)

# gRPC's retry policy (gRFC A6) reads this trailer: a negative value says "do not send this call
# again". The server sends it with every error its handlers raise but busy (pictor.server.errors,
# which also checks request sizes itself, so that gRPC's own RESOURCE_EXHAUSTED for one over the
# limit does not come back without it): a client whose policy resends RESOURCE_EXHAUSTED
# (PictorClient's) resends only the calls refused as busy, not those refused for a full disk.
NO_RESEND = ("grpc-retry-pushback-ms", "-1")

# Most specific first: the first matching entry wins.
STATUS_OF_ERROR: tuple[tuple[type[PictorError], grpc.StatusCode], ...] = (
    (InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (IncompatibleModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServerBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
)

# Each code back to its most general error (later entries win): INVALID_ARGUMENT is an
# InvalidRequestError. A cancelled call (its channel closed by another thread, or ended by a
# server that stopped) lost its answer as a lost connection does: no timeout, and a write's
# outcome is not known.
_ERROR_OF_STATUS: dict[grpc.StatusCode, type[PictorError]] = {
    code: error for error, code in STATUS_OF_ERROR} | {grpc.StatusCode.CANCELLED: ServerUnavailableError}


def status_for(error: BaseException) -> grpc.StatusCode:
    """gRPC status code for a domain error; INTERNAL for anything unexpected."""
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, message: str) -> PictorError:
    """The domain error a client raises for a failed call."""
    return _ERROR_OF_STATUS.get(code, PictorError)(f"{message} ({code.name})")
