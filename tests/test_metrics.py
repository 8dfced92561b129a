"""`pictor serve --metrics-port`: Prometheus metrics of a real server, scraped over HTTP."""

from __future__ import annotations

import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess, drawn_image, free_port, held_open, pictor, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pictor.client import PictorClient, UpsertItem
from pictor.errors import InvalidRequestError, ServerUnavailableError
from pictor.server.metrics import Metrics


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the server's /metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def calls(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], method: str, code: str) -> float:
    return samples.get(("grpc_server_handled_total", frozenset({
        "grpc_type": "client_stream" if method == "Upsert" else "unary", "grpc_service": "pictor.v1.Pictor",
        "grpc_method": method, "grpc_code": code}.items())), 0.0)


def test_metrics_count_calls_by_method_and_status_and_the_index(built_index: Path) -> None:
    metrics_port = free_port()
    server = ServerProcess(built_index, "--metrics-port", str(metrics_port)).start()
    try:
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in server.read_log()
        assert scrape(metrics_port)[("pictor_index_items", frozenset())] == 12
        with PictorClient(server.target) as client:
            for _ in range(3):
                client.search(image=drawn_image(1), k=2)
            with pytest.raises(InvalidRequestError):
                client.classify(b"not an image")
            client.upsert([UpsertItem(key="new", vector=client.embed([drawn_image(99)])[0])])
            client.health()
        samples = scrape(metrics_port)
        assert calls(samples, "Search", "OK") == 3
        assert calls(samples, "Classify", "INVALID_ARGUMENT") == 1 and calls(samples, "Classify", "OK") == 0
        assert calls(samples, "Upsert", "OK") == 1 and calls(samples, "Embed", "OK") == 1
        assert samples[("grpc_server_handling_seconds_count", frozenset({
            "grpc_type": "unary", "grpc_service": "pictor.v1.Pictor", "grpc_method": "Search"}.items()))] == 3
        assert samples[("grpc_server_handled_total", frozenset({
            "grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check",
            "grpc_code": "OK"}.items()))] >= 1
        assert samples[("pictor_index_items", frozenset())] == 13  # read at each scrape
        assert samples[("pictor_model_images_total", frozenset())] == 3 + 1  # the searches, the embed
        for stage in ("decode", "wait", "forward"):
            assert samples[("pictor_model_seconds_count", frozenset({"stage": stage}.items()))] == 4
        assert samples[("pictor_model_seconds_sum", frozenset({"stage": "forward"}.items()))] > 0
        # One call at a time: a pass each (concurrent calls share passes: tests/test_server.py).
        assert samples[("pictor_model_batch_images_count", frozenset())] == 4
        assert samples[("pictor_model_batch_images_sum", frozenset())] == 4
        assert samples[("process_resident_memory_bytes", frozenset())] > 0
        assert not [name for name, _ in samples if name.endswith("_created")]  # as the Go client's

        # A call its client gave up on is counted as the client saw it, not as the work ended:
        # this stream's server side ended with its own error (no final message marked last).
        sent, release = threading.Event(), threading.Event()
        with ThreadPoolExecutor(1) as pool:
            client = PictorClient(server.target)
            stream = pool.submit(client.upsert, held_open("held", release, sent))
            assert sent.wait(30)
            client.close()  # cancels the open stream
            release.set()
            with pytest.raises(ServerUnavailableError):
                stream.result()
        wait_until(lambda: calls(scrape(metrics_port), "Upsert", "CANCELLED") == 1)
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert scrape(metrics_port)[("grpc_server_handled_total", frozenset({
            "grpc_type": "server_stream", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch",
            "grpc_code": "UNIMPLEMENTED"}.items()))] == 1
    finally:
        assert server.stop() == 0


def test_the_index_size_is_not_reported_before_it_is_known() -> None:
    metrics = Metrics()
    assert b"pictor_index_items" not in generate_latest(metrics.registry)  # loading: not 0 items
    metrics.count_index(lambda: 7)
    assert b"pictor_index_items 7.0" in generate_latest(metrics.registry)


def test_a_busy_metrics_port_is_refused_before_loading(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The index does not exist either: the port is checked first.
        r = pictor("serve", "--index", str(tmp_path / "missing"), "--port", "0", "--metrics-port", str(port),
                   check=False)
    assert r.returncode == 2
    assert f"pictor serve: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in r.stderr
    r = pictor("serve", "--index", str(tmp_path / "missing"), "--port", "6000", "--metrics-port", "6000", check=False)
    assert r.returncode == 2 and "metrics_port" in r.stderr and "another port than the gRPC port 6000" in r.stderr
