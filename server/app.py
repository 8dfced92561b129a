"""Building the gRPC server is separate from running it.

``create_server(settings)`` returns a started-able ``(server, port, engine)``; tests bind port 0
and read the real port back. ``serve(settings)`` runs it until SIGINT/SIGTERM, then drains.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from pictor.config import ServerSettings
from pictor.errors import InvalidRequestError, PictorError, ResourceExhaustedError, shown
from pictor.server.auth import TokenInterceptor
from pictor.server.engine import Engine
from pictor.server.errors import ErrorInterceptor, grpc_receive_limit
from pictor.server.limits import HandlerThreads, idle_limited
from pictor.server.metrics import Metrics, MetricsInterceptor
from pictor.server.service import PictorService
from pictor.tls import server_credentials
from pictor.v1 import pictor_pb2, pictor_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pictor_pb2.DESCRIPTOR.services_by_name["Pictor"].full_name
DRAIN_SECONDS = 10.0
ASK_POLL_SECONDS = 0.2  # how late a signal handled by a thread other than the main one may act


class CheckOnlyHealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer without ``Watch``.

    Its ``Watch`` holds the servicer's lock while it waits for a send; a stream cancelled
    before reading its first answer then deadlocks the whole server, which only SIGKILL ends
    (a few cancelled streams were enough; open upstream: grpc/grpc#43403). ``Check`` is what
    probes use (compose, Kubernetes, grpc-health-probe), and gRPC clients that watch health
    take UNIMPLEMENTED as healthy. ``Check`` answers NOT_SERVING while the index cannot be
    written (its folder deleted while open: ``IndexStore.unavailable``), so a probe restarts the
    server instead of leaving it refusing every write.
    """

    def __init__(self, unavailable: Callable[[], str | None]) -> None:
        super().__init__()
        self.unavailable = unavailable

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
              ) -> health_pb2.HealthCheckResponse:
        response = super().Check(request, context)
        if response.status == health_pb2.HealthCheckResponse.UNKNOWN:  # NOT_FOUND, with no word of why
            context.set_details(f"this server reports the health of '' (the whole server) and {SERVICE_NAME!r}, "
                                f"not of {request.service!r}")
        if response.status == health_pb2.HealthCheckResponse.SERVING and self.unavailable():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return response

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: object = None) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "health Watch is not served; use Check")


class BoundedReflectionServicer(reflection.ReflectionServicer):
    """grpcio-reflection's servicer whose streams take a stream slot, as Upsert's do, and end
    when their client goes quiet. Its streams had neither: eight idle ones (grpcurl and other
    tools open one per use) held every handler thread, and the server answered nothing else,
    health checks included."""

    def __init__(self, service_names: tuple[str, ...], threads: HandlerThreads, idle_s: float) -> None:
        super().__init__(service_names)
        self.threads, self.idle_s = threads, idle_s

    def ServerReflectionInfo(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with self.threads.stream(refused="nothing was answered"):
            requests = idle_limited(request_iterator, self.idle_s, "reflection")
            yield from super().ServerReflectionInfo(requests, context)


def create_server(settings: ServerSettings, threads: HandlerThreads | None = None, metrics: Metrics | None = None
                  ) -> tuple[grpc.Server, int, Engine]:
    """Build the server (not started): Pictor service, health, reflection, bound to a port;
    its calls and index counted in ``metrics`` when given, which it serves from here on (the
    caller closes it)."""
    max_bytes = settings.max_message_mb * 1024 * 1024
    # Read first: a wrong certificate or key is named before anything binds or loads.
    credentials = (server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                   if settings.tls_cert else None)
    # In call order: metrics see every call and the codes the others set; a call without the
    # token is refused before the error interceptor reads its request.
    interceptors: list[grpc.ServerInterceptor] = [
        *([MetricsInterceptor(metrics)] if metrics is not None else []),
        *([TokenInterceptor(settings.token)] if settings.token else []),
        ErrorInterceptor(max_bytes),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="pictor-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", grpc_receive_limit(max_bytes)),
            ("grpc.max_send_message_length", max_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second server would bind the same
            # port and silently take half the calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    # The ports are taken before the model and index load: a busy one fails at once, not after
    # seconds of loading.
    host = _bare(settings.host)
    port = _bind(server, host, settings.port, credentials)
    try:
        if metrics is not None:
            metrics_port = metrics.serve(host, settings.metrics_port)
            log.info("metrics on http://%s/metrics", _address(host, metrics_port))
        engine = Engine.load(settings)
    except BaseException as e:
        _start(server, after=e)  # an unstarted server keeps its port until the process exits
        server.stop(None)
        raise
    if metrics is not None:
        metrics.count_index(lambda: len(engine.store))
        engine.on_forward = metrics.count_forward
        engine.batcher.on_pass = metrics.pass_images.observe
    if threads is None:
        threads = HandlerThreads(settings.workers)  # shared by the Pictor and reflection services
    pictor_pb2_grpc.add_PictorServicer_to_server(
        PictorService(engine, threads, upsert_idle_s=settings.upsert_idle_timeout, max_reply_bytes=max_bytes), server
    )

    health_servicer = CheckOnlyHealthServicer(engine.unavailable)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        BoundedReflectionServicer(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            threads, idle_s=settings.upsert_idle_timeout,
        ),
        server,
    )
    return server, port, engine


class ServerStartError(ResourceExhaustedError):
    """gRPC's start failed half way: its core started, its polling thread did not (no memory or
    process slots left for a thread). gRPC can neither stop such a server, which waits for that
    thread, nor free it: the interpreter's exit waited on it forever, deaf to SIGTERM (seen under
    `ulimit -v 4000000`), so the process must end without it (``pictor serve`` does)."""


def _start(server: grpc.Server, after: BaseException | None = None) -> None:
    """``server.start()`` (``after``: the error that has it started only to free its port)."""
    try:
        server.start()
    except RuntimeError as e:  # threading's "can't start new thread"
        before = (f"; loading had failed before it: {type(after).__name__}{f': {after}' if str(after) else ''}"
                  if after else "")
        raise ServerStartError(f"cannot start the gRPC server: {e} (out of memory or of processes? see "
                               f"`ulimit -a` and the container's limits){before}") from e


def _bare(host: str) -> str:
    """``host`` without the brackets of ``[::1]`` (gRPC reads ``[127.0.0.1]`` as a name)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _address(host: str, port: int) -> str:
    """``host:port`` as gRPC and ``--target`` take it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on ``host:port`` (over TLS with ``credentials``); the port bound."""
    address = _address(host, port)
    # Checked first, else gRPC logs its own error line before ours (and binds what it can of
    # several addresses, leaving the rest to whoever holds them).
    why = _why_not_bindable(host, port)
    if why is None:
        try:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
        except RuntimeError:  # "Failed to bind": a race with another process, or an odd address
            why = f"the port is in use, or {host} is not an address of this machine"
            if credentials is not None:  # (the likelier cause: the port was free a moment ago)
                why = (f"gRPC cannot use the TLS certificate or its key (a key type it does not take? it takes RSA "
                       f"and ECDSA P-256/P-384 keys), or {why}")
    raise InvalidRequestError(f"cannot listen on {address}: {why}")


def _why_not_bindable(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound on an address of ``host`` as gRPC binds it (SO_REUSEADDR:
    a closed connection's TIME_WAIT does not count), or None."""
    targets: list[tuple[socket.AddressFamily, Any]]
    if host.lower() == "localhost":  # gRPC takes it as both loopbacks, whatever /etc/hosts says
        targets = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))]
    elif host == "0.0.0.0":  # gRPC listens on :: then, dual-stack, where there is IPv6
        targets = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    elif (full := _ipv4_shorthand(host)) is not None:
        return f"{host} is short for the IPv4 address {full}, which gRPC takes only written in full: --host {full}"
    else:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as e:
            return f"{host or 'an empty host'} does not resolve to an address ({e.strerror or e})"
        except UnicodeError:  # a name with an empty part ("a..b") or one over 63 characters
            return f"{host} is not a valid host name"
        targets = [(family, where) for family, _, _, _, where in found]
    for family, where in targets:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:  # (on some address of all, for a wildcard)
                return "the port is in use" + ("" if where[0] in ("::", "0.0.0.0") else f" on {where[0]}")
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{where[0]} is not an address of this machine"
            # anything else (no IPv6 here, say) is gRPC's to report
    return None


def _ipv4_shorthand(host: str) -> str | None:
    """The dotted quad of an IPv4 address written short (``0``, ``127.1``, ``0x7f.1``), which
    the system resolver takes and gRPC does not; None for anything else."""
    try:
        ipaddress.ip_address(host)
        return None  # written in full
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:  # a name, or no address at all
        return None


def _tls_said(settings: ServerSettings) -> str:
    if settings.tls_client_ca:
        return f"; TLS, clients need a certificate signed by the CA of {settings.tls_client_ca}"
    return "; TLS" if settings.tls_cert else ""


def reload_model(engine: Engine, path: str, metrics: Metrics | None = None) -> None:
    """SIGHUP: serve the model file at ``path`` as it is now (a head trained again, on the same
    backbone), or say why not and keep serving the one loaded. Never fatal: a damaged or
    half-copied file is bad input, not a reason to stop serving."""
    if not path:
        log.warning("SIGHUP: no model to reload: this server was started without --model")
        return
    try:
        model = engine.reload_model(path)
    except Exception as e:
        if metrics is not None:
            metrics.reloads.labels("refused").inc()
        if isinstance(e, PictorError):
            log.error("SIGHUP: the model served is unchanged: %s", e)
        else:  # a file that reads but holds what no Pictor wrote
            log.exception("SIGHUP: the model served is unchanged: %s could not be loaded", path)
    else:
        if metrics is not None:
            metrics.reloads.labels("served").inc()
        log.info("SIGHUP: serving the model %s (sha256 %s) from now on: %d classes %s", path,
                 model.file_sha256[:12], len(model.class_names), shown(list(model.class_names), 200))


def serve(settings: ServerSettings) -> None:
    """Run until SIGINT or SIGTERM, reloading the model on SIGHUP; then stop taking calls, finish
    those in flight, close the index."""
    threads = HandlerThreads(settings.workers)
    metrics = Metrics() if settings.metrics_port else None
    # What the signals ask for, in order (SimpleQueue.put may be called from a signal handler).
    # SIGHUP's from the start: its default action would end a server still loading (a reload
    # sent during a restart), and the file is read again once it serves.
    asked: queue.SimpleQueue[str] = queue.SimpleQueue()
    before = signal.signal(signal.SIGHUP, lambda *_: asked.put("reload"))
    try:
        _serve(settings, threads, metrics, asked)
    finally:
        signal.signal(signal.SIGHUP, before)
        if metrics is not None:
            metrics.close()


def _next_ask(asked: queue.SimpleQueue[str]) -> str:
    """What the next signal asks for. Waited for in short spells: Python runs a handler in the
    main thread only, between bytecodes, and a signal the kernel hands to another thread (gRPC's,
    torch's) does not interrupt a wait here: one SIGHUP went unserved until the next signal."""
    while True:
        try:
            return asked.get(timeout=ASK_POLL_SECONDS)
        except queue.Empty:
            pass


def _serve(settings: ServerSettings, threads: HandlerThreads, metrics: Metrics | None,
           asked: queue.SimpleQueue[str]) -> None:
    server, port, engine = create_server(settings, threads, metrics)  # a signal while loading interrupts it (pictor.cli)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in before:
            signal.signal(sig, lambda *_: asked.put("stop"))
        _start(server)
        info = engine.info()
        classes = (f" of {len(info.class_names)} classes {shown(list(info.class_names), 200)}"
                   if info.classifier == "head" else "")
        log.info(
            "serving %s on %s (pid %d; %s, dim %d, %d items, %s index, %s classifier%s%s%s)",
            SERVICE_NAME, _address(_bare(settings.host), port), os.getpid(), info.backbone, info.embedding_dim,
            info.index_size, info.index_type, info.classifier, classes, _tls_said(settings),
            "; calls need the token of PICTOR_TOKEN, health checks do not" if settings.token else "",
        )
        while _next_ask(asked) == "reload":
            reload_model(engine, settings.model, metrics)
        log.info("shutting down: draining calls in flight (up to %.0fs)", DRAIN_SECONDS)
        # gRPC's stop once never completed after a long mixed session (its threads all idle):
        # the index is closed, and its snapshot written, regardless.
        if not server.stop(DRAIN_SECONDS).wait(DRAIN_SECONDS + 5):
            log.warning("gRPC had not stopped 5s after the drain; closing the index anyway")
        threads.flush_refusals()
    finally:  # also when starting failed: the index's lock and pending snapshot are not left
        engine.close()
        # Put back only now: a second signal must not cut the snapshot short, but after it one
        # must act (queued, nothing would read it: a process stuck in exit heard only SIGKILL).
        for sig, handler in before.items():
            signal.signal(sig, handler)
    log.info("stopped")
