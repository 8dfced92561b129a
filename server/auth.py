"""Bearer-token check: with a token set (``PICTOR_TOKEN``), every call but the health Check must
carry ``authorization: Bearer TOKEN``, else it is answered UNAUTHENTICATED before any work.

Health checks stay open, so container probes and load balancers need no secret. The token is
compared in constant time; it travels in clear over a plain connection, so it keeps out callers
on a network you trust (or behind a proxy that adds TLS), not eavesdroppers.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from pictor.status import NO_RESEND

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if given is not None and hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        return _refusing(handler, "this server takes calls only with its token, and this call carried "
                                  + ("none: set PICTOR_TOKEN (PictorClient(token=...))" if given is None
                                     else "another: check PICTOR_TOKEN"))


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED without reading the request."""
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.set_trailing_metadata((NO_RESEND,))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {"unary_unary": grpc.unary_unary_rpc_method_handler, "stream_unary": grpc.stream_unary_rpc_method_handler,
             "unary_stream": grpc.unary_stream_rpc_method_handler,
             "stream_stream": grpc.stream_stream_rpc_method_handler}
    kind = next(k for k in kinds if getattr(handler, k) is not None)
    return kinds[kind](refuse, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
