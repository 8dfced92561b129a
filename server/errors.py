"""Error interceptor: domain errors become gRPC status codes at the edge, in one place.

Handlers raise ``PictorError`` subclasses; this interceptor aborts the call with the code from
``pictor.status`` and the error's message. Anything unexpected is logged with its traceback
and answered INTERNAL, so one bad request never takes the server down. Request bytes that do
not parse as the method's message are INVALID_ARGUMENT too (gRPC itself would say INTERNAL), and
so is a reply over the message limit (a large k of items with large attributes), saying how to
ask for less.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from pictor.api import reply_too_large, request_too_large
from pictor.config import DEFAULT_MAX_MESSAGE_MB
from pictor.errors import (
    InvalidRequestError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    notes_text,
)
from pictor.status import NO_RESEND, status_for

log = logging.getLogger(__name__)


class _Refused:
    """Stands for request bytes the handler is not given: over the size limit, or not the
    method's message (gRPC would answer RESOURCE_EXHAUSTED without the do-not-resend trailer,
    and INTERNAL)."""

    def __init__(self, error: PictorError) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None, max_bytes: int) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Refused(ResourceExhaustedError(request_too_large(len(data), max_bytes, "this server's")))
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError: bad wire format, or invalid UTF-8 in a string field
            return _Refused(InvalidRequestError(
                f"the request is not a valid protobuf message for this method: {e}"))

    return parse


def _well_formed(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Refused):
            raise request.error
        yield request


# What makes each method's reply smaller, for the message of one over the limit.
_ASK_FOR_LESS = {"Search": "a smaller k", "Classify": "fewer neighbors", "Get": "fewer keys, or no vectors",
                 "Embed": "fewer images per call"}


def reply_over_limit(size: int, max_bytes: int, method: str) -> str:
    """The message of a reply of ``size`` bytes over the server's limit, for ``method``."""
    return reply_too_large(size, max_bytes, "this server's", _ASK_FOR_LESS.get(method.rsplit("/", 1)[-1], "less"))


def _guard(behavior: Callable[..., Any], method: str, streaming: bool, max_reply_bytes: int) -> Callable[..., Any]:
    def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            if streaming:
                request_or_iterator = _well_formed(request_or_iterator)
            elif isinstance(request_or_iterator, _Refused):
                raise request_or_iterator.error
            reply = behavior(request_or_iterator, context)
            # Checked here, where it can be explained: gRPC would send RESOURCE_EXHAUSTED "Sent
            # message larger than max", the code that also means "busy, send again".
            if (size := reply.ByteSize()) > max_reply_bytes:
                raise InvalidRequestError(reply_over_limit(size, max_reply_bytes, method))
            return reply
        except Exception as e:
            _abort(e, method, context)

    return guarded


def _guard_replies(behavior: Callable[..., Iterator[Any]], method: str) -> Callable[..., Iterator[Any]]:
    """``_guard`` for a stream of replies (reflection): the errors come while it is read."""
    def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(_well_formed(requests), context)
        except Exception as e:
            _abort(e, method, context)

    return guarded


def _abort(error: Exception, method: str, context: grpc.ServicerContext) -> None:
    """End the call with the status of ``error`` (INTERNAL, logged with its traceback, when
    it is not one of Pictor's)."""
    if isinstance(error, PictorError):
        code = status_for(error)
        # gRPC carries the message in metadata, refused above 16 KB (percent-encoded, so
        # non-ASCII counts up to 3 times): a message quoting a huge key would turn the error
        # into RESOURCE_EXHAUSTED. Cut it short, in the log too.
        message = _shortened(str(error))
        busy = isinstance(error, ServerBusyError)
        log.log(logging.DEBUG if busy else logging.INFO, "%s -> %s: %s", method, code.name, message)
        if not busy:
            context.set_trailing_metadata((NO_RESEND,))
        elif resent := dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts"):
            message += f" (refused {int(resent) + 1} times: the client sent it again after random waits)"
        context.abort(code, message)
    log.error("%s failed", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, _shortened(f"internal error in {method}; see server log{notes_text(error)}"))


# gRPC's four kinds of method, by the attribute of a method handler that holds its behaviour.
_HANDLER_OF_KIND: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler, "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    """Which kind of method ``handler`` answers: "unary_unary", "stream_unary", ..."""
    return next(kind for kind in _HANDLER_OF_KIND if getattr(handler, kind) is not None)


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
                  request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """``handler`` answering with ``behavior`` instead (and reading requests with
    ``request_deserializer``, when given): the way an interceptor wraps a method."""
    return _HANDLER_OF_KIND[handler_kind(handler)](
        behavior, request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer)


class HandlerInterceptor(grpc.ServerInterceptor):
    """An interceptor that wraps the handler of each method served (``wrap``); a call of a
    method the server does not have passes untouched (gRPC answers it UNIMPLEMENTED)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self.wrap(handler, handler_call_details)

    def wrap(self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class ErrorInterceptor(HandlerInterceptor):
    def __init__(self, max_bytes: int) -> None:
        # The server's --max-message-mb, each way. gRPC's own receive limit is set above it
        # (grpc_receive_limit) so that a request over it is refused here, with the trailer.
        self.max_bytes = max_bytes

    def wrap(self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method, kind = call.method, handler_kind(handler)
        if kind == "unary_stream":
            return handler  # server-streaming calls (health Watch, not served) pass through untouched
        guarded = (_guard_replies(handler.stream_stream, method) if kind == "stream_stream"
                   else _guard(getattr(handler, kind), method, kind == "stream_unary", self.max_bytes))
        return with_behavior(handler, guarded, _tolerant(handler.request_deserializer, self.max_bytes))


def grpc_receive_limit(max_bytes: int) -> int:
    """gRPC's receive limit for a server whose limit is ``max_bytes``: higher, so that a client
    with the default limit (or up to twice the server's) is refused by ``ErrorInterceptor``,
    which marks it do-not-resend, not by gRPC, whose refusal a retry policy sends again."""
    return min(2**31 - 1, max_bytes + max(max_bytes, DEFAULT_MAX_MESSAGE_MB * 2**20))


MAX_MESSAGE_CHARS = 1000  # at most 12 KB encoded: 4-byte characters, each byte as %XX


def _shortened(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters in all)"
