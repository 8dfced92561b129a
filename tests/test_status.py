from __future__ import annotations

import grpc
import pytest

from pictor import errors
from pictor.status import error_from_status, status_for


@pytest.mark.parametrize(
    ("error", "code", "back"),
    [
        (errors.InvalidImageError("x"), grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
        (errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
        (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (errors.IncompatibleModelError("x"), grpc.StatusCode.FAILED_PRECONDITION, errors.IncompatibleModelError),
        (errors.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
    ],
)
def test_round_trip(error: Exception, code: grpc.StatusCode, back: type) -> None:
    assert status_for(error) == code
    again = error_from_status(code, "what went wrong")
    assert isinstance(again, back)
    assert "what went wrong" in str(again)


def test_unexpected_errors_are_internal() -> None:
    assert status_for(RuntimeError("boom")) == grpc.StatusCode.INTERNAL
    assert type(error_from_status(grpc.StatusCode.INTERNAL, "x")) is errors.PictorError


def test_a_cancelled_call_is_one_whose_answer_did_not_come() -> None:
    # PictorClient.close() on another thread ended calls in flight with the base PictorError,
    # then as a timeout, which it is not.
    cancelled = error_from_status(grpc.StatusCode.CANCELLED, "Channel closed!")
    assert isinstance(cancelled, errors.ServerUnavailableError) and not isinstance(cancelled, TimeoutError)


def test_busy_is_resource_exhausted() -> None:
    # (the client tells it from the others by the server's do-not-resend trailer: test_server.py)
    assert status_for(errors.ServerBusyError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert type(error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x")) is errors.ResourceExhaustedError
