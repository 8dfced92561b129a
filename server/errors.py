"""Error interceptor: domain errors become gRPC status codes at the edge, in one place.

Handlers raise ``PictorError`` subclasses; this interceptor aborts the call with the code from
``pictor.status`` and the error's message. Anything unexpected is logged with its traceback
and answered INTERNAL, so one bad request never takes the server down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from pictor.errors import PictorError
from pictor.status import status_for

log = logging.getLogger(__name__)


def _guard(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request_or_iterator, context)
        except PictorError as e:
            code = status_for(e)
            log.info("%s -> %s: %s", method, code.name, e)
            context.abort(code, str(e))
        except Exception:
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")

    return guarded


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _guard(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # server-streaming calls (health Watch) pass through untouched
