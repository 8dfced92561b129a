"""Bearer-token check: with a token set (``PICTOR_TOKEN``), every call but health's must carry
``authorization: Bearer TOKEN``, else it is answered UNAUTHENTICATED before any work (its
request is not parsed).

Health checks stay open, so container probes and load balancers need no secret. The token is
compared in constant time; it travels in clear over a plain connection, so it keeps out callers
on a network you trust, not eavesdroppers, unless the server takes only TLS (``--tls-cert``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import grpc

from pictor.server.errors import HandlerInterceptor, with_behavior
from pictor.status import NO_RESEND

log = logging.getLogger(__name__)

# Health needs no secret: probes and gRPC's own client-side health checking (Watch, which
# this server answers UNIMPLEMENTED, read as healthy) send none.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class TokenInterceptor(HandlerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def wrap(self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if call.method in OPEN_METHODS:
            return handler
        given = [value for key, value in call.invocation_metadata or () if key == "authorization"]
        if len(given) == 1 and self._is_token(given[0]):
            return handler
        why = ("none" if not given else "another" if len(given) == 1
               else f"{len(given)} authorization headers, where one is taken")
        return _refusing(handler, call.method,
                         f"this server takes calls only with its token, and this call carried {why}: send it as "
                         "PICTOR_TOKEN for the pictor commands, PictorClient(token=...) in Python, or the header "
                         "'authorization: Bearer TOKEN'")

    def _is_token(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        # The scheme in any case, as HTTP reads it (RFC 9110); the token compared in constant time.
        return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), self._token)

def _refusing(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED, its request not parsed."""
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        log.info("%s from %s -> UNAUTHENTICATED: %s", method, context.peer(), message.split(":")[0])
        context.set_trailing_metadata((NO_RESEND,))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return with_behavior(handler, refuse, request_deserializer=lambda data: data)  # not parsed
