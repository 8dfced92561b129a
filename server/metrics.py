"""Prometheus metrics of a running server, served over HTTP by ``pictor serve --metrics-port``.

The call metrics use the names of go-grpc-prometheus (and py-grpc-prometheus), so the usual gRPC
dashboards read them: ``grpc_server_started_total``, ``grpc_server_handled_total`` (by status
code) and ``grpc_server_handling_seconds``. Beside them: ``pictor_index_items``, the model's
``pictor_model_images_total`` and ``pictor_model_seconds`` (by stage: decode, wait, forward),
and the process's memory, CPU time and open files (prometheus-client's process collector).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from pictor.errors import InvalidRequestError

# Seconds: from a health check (~1 ms) to a Classify queued behind a busy model (seconds).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class Metrics:
    """The server's metrics, in a registry of their own (a process may run several servers:
    the tests do)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.started = Counter("grpc_server_started_total", "gRPC calls started on the server", _LABELS,
                               registry=self.registry)
        self.handled = Counter("grpc_server_handled_total", "gRPC calls answered by the server, by status code",
                               (*_LABELS, "grpc_code"), registry=self.registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "seconds from a call's start to its answer",
                                 _LABELS, buckets=_BUCKETS, registry=self.registry)
        self.index_items = Gauge("pictor_index_items", "items the served index holds", registry=self.registry)
        self.images = Counter("pictor_model_images_total", "images through the model (Classify, Embed, Search "
                              "by image, Upsert of images)", registry=self.registry)
        # As Triton's queue and compute times: what a call waits for, and what the model takes.
        self.stage_seconds = Histogram("pictor_model_seconds", "seconds of a call's images: decoding them, "
                                       "waiting for the model (one forward pass at a time), the forward pass",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        self._http: Any = None
        self._methods: dict[str, _MethodCounts] = {}

    def count_forward(self, images: int, decode: float, wait: float, forward: float) -> None:
        """Engine.on_forward: one forward pass."""
        self.images.inc(images)
        for stage, seconds in (("decode", decode), ("wait", wait), ("forward", forward)):
            self.stage_seconds.labels(stage).observe(seconds)

    def count_index(self, size: Callable[[], int]) -> None:
        """Read the index's size from ``size`` at each scrape (0 until then: it is loading)."""
        self.index_items.set_function(size)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: a free port) from a thread; returns the port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise InvalidRequestError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observed(self, behavior: Callable[..., Any], method: str, kind: str) -> Callable[..., Any]:
        """``behavior`` (a unary or client-streaming handler) counted and timed."""
        counts = self._counts_of(method, kind)

        def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            started = counts.start()
            try:
                reply = behavior(request_or_iterator, context)
            except BaseException:  # an abort (its status set on the context), or the call cut off
                counts.end(_code_of(context, otherwise=grpc.StatusCode.CANCELLED), started)
                raise
            counts.end(_code_of(context, otherwise=grpc.StatusCode.OK), started)
            return reply

        return call

    def observed_stream(self, behavior: Callable[..., Iterator[Any]], method: str, kind: str
                        ) -> Callable[..., Iterator[Any]]:
        """``observed`` for a stream of replies: timed until its last reply."""
        counts = self._counts_of(method, kind)

        def call(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = counts.start()
            try:
                yield from behavior(requests, context)
            except BaseException:
                counts.end(_code_of(context, otherwise=grpc.StatusCode.CANCELLED), started)
                raise
            counts.end(_code_of(context, otherwise=grpc.StatusCode.OK), started)

        return call

    def _counts_of(self, method: str, kind: str) -> _MethodCounts:
        # Kept: gRPC asks the interceptor at every call, and finding the labels' children anew
        # was 5 of the 9 microseconds the metrics cost a call here.
        if (counts := self._methods.get(method)) is None:
            counts = self._methods[method] = _MethodCounts(self, _call_labels(method, kind))
        return counts


class _MethodCounts:
    """One method's metrics, its label values filled in."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self._started = metrics.started.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._handled, self._labels = metrics.handled, labels
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def start(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def end(self, code: grpc.StatusCode, started: float) -> None:
        self._seconds.observe(time.perf_counter() - started)
        if (handled := self._by_code.get(code)) is None:
            handled = self._by_code[code] = self._handled.labels(*self._labels, code.name)
        handled.inc()


def _call_labels(method: str, kind: str) -> tuple[str, str, str]:
    """("unary", "pictor.v1.Pictor", "Search") of "/pictor.v1.Pictor/Search"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return kind, service, name


def _code_of(context: grpc.ServicerContext, *, otherwise: grpc.StatusCode) -> grpc.StatusCode:
    """The status the handler set (an abort, or health's NOT_FOUND on a reply), else ``otherwise``."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else otherwise


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every call the handlers behind it answer (put it first: it then sees
    the status codes ``ErrorInterceptor`` sets)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method, m = handler_call_details.method, self.metrics
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                m.observed(handler.unary_unary, method, "unary"),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                m.observed(handler.stream_unary, method, "client_stream"),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                m.observed_stream(handler.stream_stream, method, "bidi_stream"),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler  # server-streaming calls (health Watch, refused) pass through uncounted
