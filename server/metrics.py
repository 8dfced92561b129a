"""Prometheus metrics of a running server, served over HTTP by ``pictor serve --metrics-port``.

The call metrics use the names of go-grpc-prometheus (and py-grpc-prometheus), so the usual gRPC
dashboards read them: ``grpc_server_started_total``, ``grpc_server_handled_total`` (by status
code) and ``grpc_server_handling_seconds``. Beside them: ``pictor_index_items`` (from the end of
loading), the model's ``pictor_model_images_total``, ``pictor_model_seconds`` (by stage:
decode, wait, forward), ``pictor_model_batch_images`` and ``pictor_model_reloads_total`` (by
result), and the process's memory, CPU time and open files (prometheus-client's process
collector).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from pictor.errors import InvalidRequestError
from pictor.server.errors import HandlerInterceptor, handler_kind, with_behavior

# Seconds: from a health check (~1 ms) to a Classify queued behind a busy model (seconds).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# go-grpc-prometheus's grpc_type of each kind of method.
_TYPE_OF_KIND = {"unary_unary": "unary", "stream_unary": "client_stream", "unary_stream": "server_stream",
                 "stream_stream": "bidi_stream"}


class Metrics:
    """The server's metrics, in a registry of their own (a process may run several servers:
    the tests do)."""

    def __init__(self) -> None:
        # Without a *_created series beside each counter and histogram (as the Go client): half
        # the series, and what gRPC dashboards expect.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.started = Counter("grpc_server_started_total", "gRPC calls started on the server", _LABELS,
                               registry=self.registry)
        self.handled = Counter("grpc_server_handled_total", "gRPC calls answered by the server, by status code",
                               (*_LABELS, "grpc_code"), registry=self.registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "seconds from a call's start to its answer",
                                 _LABELS, buckets=_BUCKETS, registry=self.registry)
        self.images = Counter("pictor_model_images_total", "images through the model (Classify, Embed, Search "
                              "by image, Upsert of images)", registry=self.registry)
        # As Triton's queue and compute times: what a call waits for, and what the model takes.
        self.stage_seconds = Histogram("pictor_model_seconds", "seconds of a call's images: decoding them, "
                                       "waiting for the model (one forward pass at a time), their forward pass",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        # As Triton's execution count beside its inference count: _count is passes, _sum images.
        self.pass_images = Histogram("pictor_model_batch_images", "images per forward pass (the images of all "
                                     "calls waiting for the model, batched)", buckets=_BATCH_BUCKETS,
                                     registry=self.registry)
        self.reloads = Counter("pictor_model_reloads_total", "SIGHUP reloads of the --model file, by result: "
                               "served (the file read serves from then on) or refused (the model before stays)",
                               ["result"], registry=self.registry)
        self._http: Any = None
        self._methods: dict[str, _MethodCounts] = {}

    def count_forward(self, images: int, decode: float, wait: float, forward: float) -> None:
        """Engine.on_forward: one call's images through the model."""
        self.images.inc(images)
        for stage, seconds in (("decode", decode), ("wait", wait), ("forward", forward)):
            self.stage_seconds.labels(stage).observe(seconds)

    def count_index(self, size: Callable[[], int]) -> None:
        """Report the index's size from now on, read from ``size`` at each scrape. Called once
        the index is loaded: until then there is no series ("not known yet"; 0 would say empty)."""
        Gauge("pictor_index_items", "items the served index holds", registry=self.registry).set_function(size)

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

    def observed(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` counted and timed (a stream of replies until its last)."""
        kind = handler_kind(handler)
        behavior = getattr(handler, kind)
        # Kept: gRPC asks the interceptor at every call, and finding the labels' children anew
        # cost a call 5 microseconds more here.
        if (counts := self._methods.get(method)) is None:
            counts = self._methods[method] = _MethodCounts(self, _call_labels(method, kind))

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            with _Counted(counts, context):
                return behavior(request, context)

        def replies(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _Counted(counts, context):
                yield from behavior(request, context)

        return with_behavior(handler, replies if kind.endswith("_stream") else call)


class _MethodCounts:
    """One method's metrics, its label values filled in."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.started = metrics.started.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._handled, self._labels = metrics.handled, labels
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def end(self, code: grpc.StatusCode, started: float) -> None:
        self._seconds.observe(time.perf_counter() - started)
        if (handled := self._by_code.get(code)) is None:
            handled = self._by_code[code] = self._handled.labels(*self._labels, code.name)
        handled.inc()


class _Counted:
    """One call, counted as started on entry and as handled, with its status code, on exit."""

    __slots__ = ("_context", "_counts", "_started")

    def __init__(self, counts: _MethodCounts, context: grpc.ServicerContext) -> None:
        self._counts, self._context = counts, context

    def __enter__(self) -> None:
        self._counts.started.inc()
        self._started = time.perf_counter()

    def __exit__(self, error: type[BaseException] | None, _value: BaseException | None,
                 _traceback: TracebackType | None) -> None:
        self._counts.end(_status_of(self._context, failed=error is not None), self._started)


def _status_of(context: grpc.ServicerContext, *, failed: bool) -> grpc.StatusCode:
    """The status the caller gets: its deadline's or cancellation's when it has gone (the work
    may have finished regardless), else the one the handler set (an abort, or health's NOT_FOUND
    on a reply), else OK, or UNKNOWN for an error that set none."""
    if not context.is_active():
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _call_labels(method: str, kind: str) -> tuple[str, str, str]:
    """("unary", "pictor.v1.Pictor", "Search") of "/pictor.v1.Pictor/Search"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return _TYPE_OF_KIND[kind], service, name


class MetricsInterceptor(HandlerInterceptor):
    """Counts and times every call the handlers behind it answer (put it first: it then sees
    the status codes ``ErrorInterceptor`` sets)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self.metrics.observed(handler, call.method)
