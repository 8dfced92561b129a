"""End to end: `pictor index` + `pictor serve` as real subprocesses, driven through the client."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from conftest import DATA, ServerProcess, drawn_image, free_port, held_open, pictor, wait_until
from PIL import Image

from pictor.api import MAX_GET_KEYS, UPSERT_CHUNK
from pictor.client import PictorClient, UpsertItem
from pictor.config import ServerSettings
from pictor.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    ServerUnavailableError,
)
from pictor.server.app import create_server


def open_held_stream(client: PictorClient, pool: ThreadPoolExecutor, key: str,
                     release: threading.Event) -> Future[tuple[int, int]]:
    """An Upsert of ``held_open(key, release)`` that the server has begun: the channel is
    connected first and the item taken, so the grace below is the server's alone."""
    client.health()
    sent = threading.Event()
    upload = pool.submit(client.upsert, held_open(key, release, sent))
    assert sent.wait(30)
    time.sleep(0.5)  # the server's handler takes its thread
    return upload


def test_search_finds_the_gallery_image_itself(server: ServerProcess, shared_gallery: Path) -> None:
    image = sorted(shared_gallery.rglob("*.png"))[3]
    with PictorClient(server.target) as client:
        hits = client.search(image=image.read_bytes(), k=3)
    assert hits[0].key == image.as_posix()
    assert hits[0].score >= 0.99
    assert hits[0].label == image.parent.name
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_sighup_without_a_model_changes_nothing(server: ServerProcess) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: no model to reload" in server.read_log())
    with PictorClient(server.target) as client:
        assert client.health() == "SERVING" and client.info().classifier == "imagenet"


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "tgkill"), reason="needs Linux's tgkill (glibc 2.30+)")
def test_a_signal_handled_by_another_thread_than_the_main_one_is_acted_on(server: ServerProcess) -> None:
    """The kernel may hand a signal sent to the process to any of its threads; Python runs the
    handler in the main thread only, which was waiting for it and never woke (a SIGHUP lost)."""
    assert server.proc is not None
    pid = server.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    before = server.read_log().count("SIGHUP: no model to reload")
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, others[-1], signal.SIGHUP) == 0
    wait_until(lambda: server.read_log().count("SIGHUP: no model to reload") > before, timeout=5)


def test_a_sighup_while_the_server_loads_is_a_reload_once_it_serves(built_index: Path) -> None:
    server = ServerProcess(built_index)

    def hang_up_while_loading() -> None:  # (as `docker compose kill -s HUP` during a restart)
        wait_until(lambda: server.proc is not None and " opened: " in server.read_log(), poll=0.01)
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

    sender = threading.Thread(target=hang_up_while_loading)
    sender.start()
    server.start()
    sender.join()
    try:
        wait_until(lambda: "SIGHUP: no model to reload" in server.read_log())  # its default action ended it
    finally:
        stopped = server.stop()
    assert stopped == 0


def test_serve_gives_sigint_and_sigterm_back_once_stopped(built_index: Path) -> None:
    """Its handlers queue a stop for a loop that has ended by then: a process stuck in its exit
    (gRPC's threads) would hear nothing but SIGKILL."""
    from pictor.server.app import serve

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop_once_serving() -> None:
        wait_until(lambda: signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM], poll=0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_serving)
    stopper.start()
    serve(ServerSettings(index=str(built_index), port=0, workers=4, device="cpu"))
    stopper.join()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_info_and_health(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.cli import main

    with PictorClient(server.target) as client:
        info = client.info()
        assert client.health() == "SERVING"
        assert client.health("pictor.v1.Pictor") == "SERVING"
    assert main(["health", "--target", server.target]) == 0 and capsys.readouterr().out == "SERVING\n"
    nobody = f"localhost:{free_port()}"
    assert main(["health", "--target", nobody, "--timeout", "2"]) == 4
    assert "is `pictor serve` running there?" in capsys.readouterr().err
    assert main(["health", "--target", nobody, "--timeout", "2", "--json"]) == 4
    answer = json.loads(capsys.readouterr().out)  # a script parses an answer either way
    assert answer["health"] == "UNREACHABLE" and nobody in answer["error"]
    other = grpc.server(ThreadPoolExecutor(1))  # a gRPC server of something else
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        assert main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "5"]) == 4
        assert f"the gRPC server at 127.0.0.1:{port} is not a Pictor server" in capsys.readouterr().err
        with PictorClient(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(ServerUnavailableError,
                               match=rf"127.0.0.1:{port} has no Classify call: a Pictor server older than"):
                client.classify(b"x")  # not the bare "Method not found!"
            with pytest.raises(ServerUnavailableError, match="has no Upsert call") as no_upsert:
                client.upsert([UpsertItem(key="a", vector=[1.0])])
            assert "written" not in str(no_upsert.value)  # an answer: nothing was, not "may have been"
    finally:
        other.stop(None)
    assert info.index_size == 12 and info.label_counts == {"cool": 6, "warm": 6}
    assert info.embedding_dim == 1280  # efficientnet_lite0's pooled features
    assert info.backbone == "efficientnet_lite0"
    assert (info.pooling, info.layer) == ("avg", "")  # how the index's vectors were made
    assert info.classifier == "imagenet"
    assert len(info.class_names) == 1000
    assert info.open_set == ""  # no trained model: never "unknown"


def test_cancelled_health_watches_do_not_stall_the_server(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # grpcio-health-checking's Watch deadlocked the whole server when streams were cancelled
    # before their first answer (grpc/grpc#43403): Watch is not served, Check is.
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(20)]
            for watch in watches:
                watch.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # A service the server does not report on is NOT_FOUND, saying which it reports on.
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == ("this server reports the health of '' (the whole server) and "
                                     "'pictor.v1.Pictor', not of 'nope'")
    with PictorClient(server.target, timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.info().index_size == 12


def test_bad_input_is_invalid_argument_and_server_keeps_answering(server: ServerProcess,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    channel = grpc.insecure_channel(server.target)
    from pictor.v1 import pictor_pb2 as pb
    from pictor.v1 import pictor_pb2_grpc as pb_grpc

    stub = pb_grpc.PictorStub(channel)
    for bad in (b"this is not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 50):
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(pb.ClassifyRequest(image=bad), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details()  # a message that says what was wrong
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(vector=pb.Vector(values=[1.0, 2.0])), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1280" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=5), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Where 0 means the default, the ranges say so.
    for method, message, words in ((stub.Classify, pb.ClassifyRequest(image=drawn_image(1), neighbors=1001),
                                    "neighbors must be between 1 and 1000 (or 0 for 10), got 1001"),
                                   (stub.List, pb.ListRequest(limit=1001), "limit must be between 1 and 1000 (or 0 for 1000)"),
                                   (stub.Classify, pb.ClassifyRequest(image=drawn_image(1), classifier=99),  # type: ignore[arg-type]  # (an open enum)
                                    "unknown classifier value 99; choose from 0 CLASSIFIER_UNSPECIFIED, 1 CLASSIFIER_HEAD, "
                                    "2 CLASSIFIER_KNN, 3 CLASSIFIER_ALL")):
        with pytest.raises(grpc.RpcError) as e:
            method(message, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    # An Upsert stream's items after its last full chunk are written only when its final
    # message says `last` (gRPC can deliver a cut-off stream as ended): a raw client is told so.
    def raw_items(n: int, *, last_at: int | None) -> Iterator[pb.UpsertRequest]:
        for i in range(n):
            yield pb.UpsertRequest(item=pb.Item(key=f"raw/{i}", vector=pb.Vector(values=[i + 1.0] * 1280)),
                                   last=i == last_at)

    def refused(requests: Iterator[pb.UpsertRequest]) -> str:
        with pytest.raises(grpc.RpcError) as e:
            stub.Upsert(requests, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return str(e.value.details())

    unmarked = (r"the stream's final message was not marked `last`, as a stream cut off \(cancelled, its deadline "
                r"passed, its client failed\) ends{}; mark the final message last \(PictorClient 0.2 and later does\); "
                r"the first 64 items of the stream were written")
    assert re.fullmatch(unmarked.format(", so the 1 item after its last full chunk was not written"),
                        refused(raw_items(65, last_at=None)))
    assert re.fullmatch(unmarked.format(""), refused(raw_items(64, last_at=None)))  # told, though all was written
    assert stub.Delete(pb.DeleteRequest(keys=[f"raw/{i}" for i in range(65)]), timeout=30).deleted == 64
    assert refused(raw_items(2, last_at=0)) == ("message 1 (counting from 0) came after the one marked `last`, which "
                                                "must be the stream's final message")
    assert stub.Upsert(raw_items(2, last_at=1), timeout=30).inserted == 2  # marked on the item itself
    assert stub.Delete(pb.DeleteRequest(keys=["raw/0", "raw/1"]), timeout=30).deleted == 2
    # Bytes that are not the method's message (gRPC's own answer would be INTERNAL).
    garbage = b"\x0a\x05\xff\xfe\xfd\xfc"  # field 1 (a string) holding invalid UTF-8
    search = channel.unary_unary("/pictor.v1.Pictor/Search")
    upsert = channel.stream_unary("/pictor.v1.Pictor/Upsert")
    for call, request in ((search, garbage), (upsert, iter([garbage]))):
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in e.value.details()
    channel.close()

    with PictorClient(server.target) as client:  # still serving
        assert client.info().index_size == 12
        with pytest.raises(NotFoundError):
            client.search(key="no/such/key")
        # A message quoting a huge key would pass gRPC's 16 KB metadata limit (emoji encode to
        # 12 bytes each) and come back as RESOURCE_EXHAUSTED: it is cut short instead.
        with pytest.raises(NotFoundError, match="no item with key"):
            client.search(key="\U0001f600" * 4096)
        with pytest.raises(InvalidRequestError, match="k must be"):
            client.search(image=drawn_image(1), k=100000)
        # The proto reads 0 as "default" and has no negatives: the client refuses them itself.
        for k in (0, -1):
            with pytest.raises(InvalidRequestError, match=f"k must be between 1 and 1000, got {k}"):
                client.search(image=drawn_image(1), k=k)
        with pytest.raises(InvalidRequestError, match="top_k must be between 1 and 1000"):
            client.classify(drawn_image(1), top_k=0)
        with pytest.raises(InvalidRequestError, match="neighbors must be between 0 and 1000"):
            client.classify(drawn_image(1), neighbors=-1)
        # A bad image among several: named by its key, and nothing of the request written.
        items = [UpsertItem(key="good-1", image=drawn_image(2)), UpsertItem(key="broken", image=b"GIF89a"),
                 UpsertItem(key="good-2", image=drawn_image(3))]
        with pytest.raises(InvalidRequestError, match=r"item 'broken': .*none of these 3 items were written"):
            client.upsert(items)
        with pytest.raises(InvalidRequestError, match=r"item 'broken': .*; the item was not written \("):
            client.upsert(items[1:2])
        assert client.info().index_size == 12
        with pytest.raises(InvalidRequestError, match="item 'short': vector has 3 values"):
            client.upsert([UpsertItem(key="short", vector=[1.0, 2.0, 3.0])])
        # An image over the message size limit: what is too large and what to do, not gRPC's words.
        with PictorClient(server.target, max_message_mb=1) as small, pytest.raises(
                ResourceExhaustedError, match=r"a request of 2\.00 MB is over this client's 1 MB limit; .*--max-message-mb"):
            small.classify(drawn_image(1) + b"\0" * 2**21)
        big = [UpsertItem(key="small", image=drawn_image(4)), UpsertItem(key="big", image=drawn_image(5) + b"\0" * 2**21)]
        with PictorClient(server.target, max_message_mb=1) as small, pytest.raises(  # which item of a stream it was
                ResourceExhaustedError, match=r"item 'big' \(item 1, counting from 0\): a request of 2\.00 MB is over"):
            small.upsert(big)
        assert client.info().index_size == 12  # a list is checked whole before anything is sent
        # Any bytes-like image is an image.
        assert client.classify(bytearray(drawn_image(1))).labels
        assert len(client.embed([memoryview(drawn_image(1))])) == 1
        # A query whose float32 norm would overflow is still a direction.
        assert len(client.search(vector=[1e38] * 1280, k=1)) == 1

        def failing_items():  # the caller's own iterator fails halfway: its error, nothing written
            yield UpsertItem(key="never", image=drawn_image(4))
            raise OSError("the disk went away")

        with pytest.raises(OSError, match="the disk went away"), caplog.at_level("ERROR"):
            client.upsert(failing_items())
        assert "Exception iterating requests" not in caplog.text  # nor its traceback: raised once, here

        def interrupted_items():  # Ctrl-C in the caller's iterator: raised, not a call left waiting
            yield UpsertItem(key="never", vector=[1.0] * 1280)
            raise KeyboardInterrupt

        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            client.upsert(interrupted_items())
        assert time.monotonic() - started < 5  # not the client's 30 s deadline
        with pytest.raises(InvalidRequestError, match="upsert takes UpsertItem objects, got str"):
            client.upsert(iter(["a.jpg"]))  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"item 'a': attributes map text to text, got 'n': 3; write numbers as text"):
            client.upsert([UpsertItem(key="a", vector=[1.0], attributes={"n": 3})])  # type: ignore[dict-item]
        with pytest.raises(InvalidRequestError, match="item 'a': the key, the label and each attribute name and value must be text"):
            client.upsert([UpsertItem(key="a", vector=[1.0], label=3)])  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"key must be text \(str\), got int 5 \(item 1, counting from 0\)"):
            client.upsert([UpsertItem(key="a", vector=[1.0]), UpsertItem(key=5, vector=[1.0])])  # type: ignore[arg-type]
        # A dict sent its keys as the vector (0, 1, 2, ...), a set its numbers in no order, True 1.0.
        for vector, why in [({i: 0.5 for i in range(1280)}, "in order, got a dict"), ({0.5, 0.25}, "in order, got a set"),
                            ([True] * 1280, "got true/false values"), (np.ones(1280, bool), "got true/false values"),
                            (np.ones((1, 1280)), r"one row of numbers, got an array of shape \(1, 1280\)")]:
            with pytest.raises(InvalidRequestError, match=f"a vector must be .*{why}"):
                client.upsert([UpsertItem(key="a", vector=vector)])
            with pytest.raises(InvalidRequestError, match=f"a vector must be .*{why}"):
                client.search(vector=vector, k=1)
        assert client.search(vector=iter([1.0] * 1280), k=1)  # an iterator is still read, once
        # labels=None is no filter, as attributes=None is (it was "got a single NoneType").
        assert len(client.search(vector=[1.0] * 1280, k=3, labels=None)) == 3
        assert client.info().index_size == 12

        # The timeout counts the making of the items too ("all of it"): the first took 3 s of
        # a 1 s timeout, and the call then waited out a deadline of its own.
        def slow_items() -> Iterator[UpsertItem]:
            for i in range(2):
                time.sleep(3)
                yield UpsertItem(key=f"slow/{i}", vector=[1.0] * 1280)

        with PictorClient(server.target, timeout=1) as hurried:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                hurried.upsert(slow_items())
            assert time.monotonic() - started < 3.7  # (4 s before)
        assert client.info().index_size == 12


def test_classify_with_imagenet_labels_and_knn(server: ServerProcess) -> None:
    with PictorClient(server.target) as client:
        r = client.classify((DATA / "daisy.jpg").read_bytes(), top_k=3)
        assert r.source == "imagenet"
        assert r.labels[0].name == "daisy"
        assert len(r.labels) == 3
        knn = client.classify(drawn_image(2), classifier="knn", neighbors=3)
        assert knn.source == "knn"
        assert knn.labels[0].name in {"warm", "cool"}
        assert len(knn.neighbors) == 3


def test_embed_matches_search_space(server: ServerProcess, shared_gallery: Path) -> None:
    image = sorted(shared_gallery.rglob("*.png"))[0]
    with PictorClient(server.target) as client:
        (vector,) = client.embed([image.read_bytes()])
        assert len(vector) == 1280
        assert client.search(vector=vector, k=1)[0].key == image.as_posix()


def test_add_and_delete_survive_sigkill(built_index: Path) -> None:
    from pictor.v1.pictor_pb2 import GetRequest
    from pictor.v1.pictor_pb2_grpc import PictorStub

    server = ServerProcess(built_index).start()
    new = drawn_image(1000)
    with PictorClient(server.target) as client:
        item = UpsertItem(key="new/one.png", image=new, label="fresh", attributes={"by": "test"})
        assert client.upsert([item]) == (1, 0)
        assert client.search(image=new, k=1)[0].key == "new/one.png"
        gone = client.search(key="new/one.png", k=2)[1].key
        assert client.delete([gone, "never/there"]) == (1, ["never/there"])
        assert gone not in [h.key for h in client.search(image=new, k=13)]
        # Labels that look alike are one: stored composed, found by either form.
        assert client.upsert([UpsertItem(key="accent", vector=[1.0] * 1280, label="rose\u0301s")]) == (1, 0)
        assert [h.label for h in client.search(key="accent", k=1, labels=["ros\u00e9s"])] == ["ros\u00e9s"]
        r = pictor("search", "--key", "accent", "--label", "rose\u0301s", "--target", server.target)
        assert "accent" in r.stdout and "note" not in r.stderr  # the label is there, as typed
        client.delete(["accent"])
    server.kill()  # SIGKILL: no shutdown hook runs

    again = ServerProcess(built_index).start()
    try:
        with PictorClient(again.target) as client:
            assert client.info().index_size == 12  # 12 + 1 added - 1 deleted
            hit = client.search(image=new, k=1)[0]
            assert (hit.key, hit.label, hit.attributes) == ("new/one.png", "fresh", {"by": "test"})
            assert client.search(image=new, k=2)[1].attributes == {}  # indexed without any
            assert gone not in [h.key for h in client.search(image=new, k=12)]
            (stored,), missing = client.get(["new/one.png", gone], vectors=True)
            assert (stored.key, stored.label, stored.attributes, missing) == ("new/one.png", "fresh", {"by": "test"}, [gone])
            (embedded,) = client.embed([new])
            assert stored.vector is not None and np.allclose(stored.vector, embedded, atol=1e-5)
            with grpc.insecure_channel(again.target) as channel, pytest.raises(grpc.RpcError, match="get got no keys"):
                PictorStub(channel).Get(GetRequest(), timeout=10)  # a raw stub's empty request
            # PictorClient sends nothing for nothing: the empty answer, not the server's refusal.
            assert client.get([]) == ([], []) and client.delete([]) == (0, []) and client.embed([]) == []
            assert client.upsert([]) == (0, 0) and client.upsert(iter(list[UpsertItem]())) == (0, 0)
            with pytest.raises(InvalidRequestError, match="delete: key 1 is empty; no item has an empty key"):
                client.delete(["new/one.png", ""])
            with pytest.raises(InvalidRequestError, match="is 5,000 characters long; keys take at most 4,096, so no item"):
                client.search(key="k" * 5000)  # not "not found", as if such an item could exist
            # Copies of one image under other keys tie with it: a search by its key puts it first.
            copies = [UpsertItem(key=f"copy/{i}", vector=embedded) for i in range(20)]
            client.upsert(copies)
            assert [client.search(key=c.key, k=1)[0].key for c in copies] == [c.key for c in copies]
            with pytest.raises(InvalidRequestError, match="at most 1000 distinct keys per call, got 1001"):
                client.get([f"k{i}" for i in range(1001)])
            assert client.get(["once"] * 1001) == ([], ["once"])  # one key, however often asked
            # A list of items is converted once: a vector given as an iterator is read once.
            assert client.upsert([UpsertItem(key="once", vector=iter(embedded))]) == (1, 0)
            (once,), _ = client.get(["once"], vectors=True)
            assert once.vector is not None and np.allclose(once.vector, embedded, atol=1e-5)
    finally:
        again.stop()


def test_client_cli_prints_results_and_json(server: ServerProcess, shared_gallery: Path, tmp_path: Path) -> None:
    image = sorted(shared_gallery.rglob("*.png"))[5]
    out = pictor("search", str(image), "-k", "2", "--target", server.target)
    assert image.as_posix() in out.stdout.splitlines()[1]
    data = json.loads(pictor("search", str(image), "-k", "2", "--json", "--target", server.target).stdout)
    assert data[0]["key"] == image.as_posix() and data[0]["score"] >= 0.99
    # Per-query search widths reach the server; one over its limit is a usage error, said once
    # (not once per image, as a refusal naming each image).
    wide = pictor("search", str(image), "-k", "2", "--nprobe", "8", "--ef-search", "64", "--target", server.target)
    assert image.as_posix() in wide.stdout.splitlines()[1]
    too_wide = pictor("search", str(image), "--ef-search", "70000", "--target", server.target, check=False)
    assert too_wide.returncode == 2 and "argument --ef-search: must be from 0 to 65536, got 70000" in too_wide.stderr
    cls = json.loads(pictor("classify", str(DATA / "daisy.jpg"), "--json", "--target", server.target).stdout)
    assert cls[0]["labels"][0]["name"] == "daisy"
    # A bad image among good ones: named, the others still answered, exit 2.
    daisy, license_ = str(DATA / "daisy.jpg"), str(DATA / "LICENSE.md")
    bad = pictor("classify", daisy, license_, str(image), "--target", server.target, check=False)
    assert bad.returncode == 2
    assert f"{license_}: " in bad.stderr and "INVALID_ARGUMENT" in bad.stderr
    assert bad.stdout.startswith(f"{daisy}  (imagenet)") and f"\n{image}  (imagenet)" in bad.stdout
    not_an_image = pictor("search", license_, "--target", server.target, check=False)  # named as classify names it
    assert not_an_image.returncode == 2 and f"pictor search: error: {license_}: " in not_an_image.stderr
    folder = pictor("classify", str(DATA), "--target", server.target, check=False)
    assert folder.returncode == 2 and f"{DATA}: a folder, not an image file (`pictor index` takes folders)" in folder.stderr
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # unreadable as an image: named once, and the next image still answered
    piped = pictor("classify", str(pipe), daisy, "--target", server.target, check=False)
    assert piped.returncode == 2 and f"pictor classify: error: {pipe}: not a regular file (a FIFO, socket or device)\n" == piped.stderr
    assert piped.stdout.startswith(f"{daisy}  (imagenet)")
    # `pictor add` keys a file by its path as `pictor index` writes it.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x.png").write_bytes(drawn_image(7))
    added = pictor("add", "./new//x.png", "new/x.png", "--attr", "source=cam1", "--target", server.target, cwd=tmp_path)
    assert added.stdout == "added 1 new, replaced 0 existing\n"  # one file named twice is one item
    pictor("add", "new/x.png", "--key-prefix", "p/", "--target", server.target, cwd=tmp_path)
    found = json.loads(pictor("search", str(tmp_path / "new/x.png"), "--attr", "source=cam1", "--json",
                              "--target", server.target).stdout)
    assert [(h["key"], h["attributes"]) for h in found] == [("new/x.png", {"source": "cam1"})]
    prefixed = json.loads(pictor("search", str(tmp_path / "new/x.png"), "--attr", "path=new/x.png", "--json",
                                 "--target", server.target).stdout)
    assert [h["key"] for h in prefixed] == ["p/new/x.png"]  # the key is not the path: kept beside it
    got = pictor("get", "new/x.png", "p/new/x.png", "--target", server.target).stdout
    assert got == "new/x.png  source=cam1\np/new/x.png  path=new/x.png\n"
    # Search shows attributes too, as get does (only --json had them).
    found = pictor("search", "--key", "new/x.png", "-k", "1", "--target", server.target).stdout
    assert found.splitlines()[1].endswith("  new/x.png  source=cam1")
    # With --missing-ok a key not found is said in the table (it was silent), not as an error.
    quiet = pictor("get", "new/x.png", "no/such", "--missing-ok", "--target", server.target)
    assert quiet.stdout == "new/x.png  source=cam1\nno/such  (not found)\n" and quiet.stderr == ""
    # More keys than a call takes go in several calls; each missing one is named once.
    unheld = [f"none/{i}" for i in range(MAX_GET_KEYS)]
    many = json.loads(pictor("get", *unheld, "p/new/x.png", *unheld[:3], "--missing-ok", "--json",
                             "--target", server.target).stdout)
    assert [it["key"] for it in many["items"]] == ["p/new/x.png"] and many["missing"] == unheld
    cut = pictor("get", *unheld, "--target", server.target, check=False)  # named: the first 20
    assert cut.returncode == 2 and f"none/19, ... ({MAX_GET_KEYS - 20:,} more; --json lists them all) (" in cut.stderr
    # A value with a space is quoted (where it ends was a guess); JSON keeps non-ASCII as it is.
    pictor("add", "new/x.png", "--key-prefix", "s/", "--attr", "note=two words", "--attr", "city=Z\u00fcrich",
           "--target", server.target, cwd=tmp_path)
    spaced = pictor("get", "s/new/x.png", "--target", server.target).stdout
    assert spaced == "s/new/x.png  city=Z\u00fcrich note='two words' path=new/x.png\n"
    assert '"city": "Z\u00fcrich"' in pictor("get", "s/new/x.png", "--json", "--target", server.target).stdout
    pictor("delete", "s/new/x.png", "--target", server.target)
    clash = pictor("add", "new/x.png", "--key-prefix", "q/", "--attr", "path=x", "--target", server.target,
                   cwd=tmp_path, check=False)
    assert clash.returncode == 2 and "--attr path=... would replace the attribute `path`" in clash.stderr
    pictor("add", str(tmp_path / "new/x.png"), "--key-prefix", "q/", "--target", server.target)
    one_slash = f"q{(tmp_path / 'new/x.png').as_posix()}"  # q/ + /tmp/...: one slash, as a path has
    assert pictor("delete", one_slash, "--target", server.target).stdout.startswith("deleted 1")
    # Listing pages through the index in key order, filtered as Search filters.
    assert pictor("list", "--attr", "source=cam1", "--target", server.target).stdout == "new/x.png  source=cam1\n"
    warm = [json.loads(line) for line in pictor("list", "--label", "warm", "--json", "--target", server.target).stdout.splitlines()]
    assert len(warm) == 6 and {w["label"] for w in warm} == {"warm"} and warm == sorted(warm, key=lambda w: w["key"])
    rest = pictor("list", "--label", "warm", "--after", warm[1]["key"], "--json", "--target", server.target).stdout
    assert [json.loads(line) for line in rest.splitlines()] == warm[2:]
    none = pictor("list", "--label", "nope", "--json", "--target", server.target)
    assert none.stdout == "" and none.stderr == ("pictor list: no items: the index has no item labelled 'nope' "
                                                 "(labels: cool 6, warm 6, (none) 2)\n")
    none = pictor("list", "--label", "warm", "--attr", "source=cam1", "--target", server.target)
    assert none.stdout == "" and "no indexed item matches the --label/--attr filter" in none.stderr
    past = pictor("list", "--after", "~~", "--target", server.target)  # the index is not empty: all sort before
    assert past.stdout == "" and past.stderr == ("pictor list: no items: no indexed item has a key after '~~' "
                                                 "(keys are listed in code point order)\n")
    for command in (["list"], ["search", "--key", "new/x.png"]):  # a filter's label must be text, as add's
        bad = pictor(*command, "--label", os.fsdecode(b"\xff"), "--target", server.target, check=False)
        assert bad.returncode == 2 and bad.stderr.endswith("error: --label '\\xff' is not UTF-8 text\n"), bad.stderr
    with PictorClient(server.target, timeout=10) as client:
        paged = list(client.iter_items(page=5))  # 14 items: pages of 5, 5 and 4
        first, after = client.list_items(limit=14)
        assert paged == first and after == "" and len(paged) == 14
        assert [it.key for it in paged] == sorted(it.key for it in paged)
        assert client.list_items(paged[-2].key) == ([paged[-1]], "")
        with pytest.raises(InvalidRequestError, match="limit must be between 1 and 1000"):
            client.list_items(limit=1001)
        with pytest.raises(InvalidRequestError, match="page must be between 1 and 1000"):
            client.iter_items(page=0)  # at the call, not at the first item
        with pytest.raises(InvalidRequestError, match="attributes map text to text"):
            client.iter_items(attributes={"n": 3})  # type: ignore[dict-item]
        # Labels are read once: a generator filters every page, not only the first; a numpy
        # array (pandas' unique()) has no truth value to test.
        assert [it.key for it in client.iter_items(labels=(x for x in ["warm"]), page=2)] == [w["key"] for w in warm]
        assert len(list(client.iter_items(labels=np.array(["warm", "cool"]), page=5))) == 12
        assert {h.label for h in client.search(key=warm[0]["key"], k=14, labels=np.array(["warm", "x"]))} == {"warm"}
    stored = json.loads(pictor("get", "new/x.png", "--vectors", "--json", "--target", server.target).stdout)
    assert stored["missing"] == [] and len(stored["items"][0]["vector"]) == 1280
    absent = pictor("get", "new/x.png", "no/such.png", "--target", server.target, check=False)
    assert absent.returncode == 2 and "pictor get: error: not found: no/such.png" in absent.stderr
    # A path as given to `pictor add` (as a shell completes it) finds the item add made of it.
    both = pictor("get", "./new//x.png", "p/new/x.png", "--target", server.target).stdout  # in the order asked
    assert both == "new/x.png  source=cam1\np/new/x.png  path=new/x.png\n"
    assert pictor("get", "./new//x.png", "new/x.png", "--target", server.target).stdout == "new/x.png  source=cam1\n"
    assert "new/x.png" in pictor("search", "--key", "./new//x.png", "-k", "1", "--target", server.target).stdout
    # A file copied from macOS is named in decomposed Unicode; the name typed is composed.
    (tmp_path / "new" / "cafe\u0301.png").write_bytes(drawn_image(8))
    pictor("add", "new/cafe\u0301.png", "--target", server.target, cwd=tmp_path)
    typed = "new/caf\u00e9.png"
    assert pictor("get", typed, "--target", server.target).stdout == "new/cafe\u0301.png\n"
    assert "new/cafe\u0301.png" in pictor("search", "--key", typed, "-k", "1", "--target", server.target).stdout
    # Both spellings held (copies from two machines): the key typed names one item, not both.
    (tmp_path / "new" / "caf\u00e9.png").write_bytes(drawn_image(9))
    pictor("add", "new/caf\u00e9.png", "--target", server.target, cwd=tmp_path)
    assert pictor("delete", "./new/caf\u00e9.png", "--target", server.target).stdout == "deleted 1\n"
    assert pictor("get", typed, "--target", server.target).stdout == "new/cafe\u0301.png\n"
    assert pictor("delete", typed, "--target", server.target).stdout == "deleted 1\n"
    named_twice = pictor("delete", "./new//x.png", "new/x.png", "--json", "--target", server.target).stdout
    assert json.loads(named_twice) == {"deleted": 1, "missing": []}  # one item, named two ways
    # Like `rm -f`: a key already gone is not an error, for scripts that retry.
    again = pictor("delete", "p/new/x.png", "new/x.png", "--missing-ok", "--target", server.target)
    assert again.stdout == "deleted 1\n" and again.stderr == ""
    every = pictor("classify", str(image), "--classifier", "all", "--neighbors", "2",
                   "--target", server.target).stdout
    assert "kNN vote: " in every and "agree" not in every  # ImageNet labels vs the index's labels
    assert f"  neighbour  1.000  {image.as_posix()}" in every
    none = pictor("search", str(image), "--label", "nosuch", "--target", server.target)
    # On stderr, as list says it: a script reading the table saw the note as a result.
    assert none.stdout == "" and none.stderr == ("pictor search: no results: the index has no item labelled "
                                                 "'nosuch' (labels: cool 6, warm 6)\n")
    some = pictor("search", str(image), "--label", "warm", "--label", "wram", "-k", "2", "--target", server.target)
    assert some.stdout.count("[warm]") == 2  # the hits of the label that exists, and a note on the other
    assert some.stderr == "pictor search: note: the index has no item labelled 'wram' (labels: cool 6, warm 6)\n"
    listed = pictor("list", "--label", "wram", "--target", server.target)  # as search says it
    assert listed.stdout == "" and listed.stderr == ("pictor list: no items: the index has no item labelled "
                                                     "'wram' (labels: cool 6, warm 6)\n")
    listed = pictor("list", "--label", "warm", "--label", "wram", "--target", server.target)
    assert listed.stdout.count("[warm]") == 6 and "note: the index has no item labelled 'wram'" in listed.stderr
    shown = pictor("info", "--target", server.target).stdout
    assert "\nlabels:       cool 6, warm 6\n" in shown
    assert "\nopen set:     off (a model file from `pictor train`" in shown  # the line was left out
    gone = pictor("delete", "no/such/key.png", "--target", server.target, check=False)
    assert gone.returncode == 2 and "not found: no/such/key.png (a key is the image's path" in gone.stderr
    # Neither as given nor as `add` would have made it: that form is shown.
    untidy = pictor("get", "./new//x.png", "--target", server.target, check=False)
    assert untidy.returncode == 2 and "stored it: new/x.png for ./new//x.png;" in untidy.stderr
    by_key = pictor("search", "--key", "./new//x.png", "--target", server.target, check=False)
    assert by_key.returncode == 2 and "stored it: new/x.png for ./new//x.png;" in by_key.stderr
    zero = pictor("search", str(image), "-k", "0", "--target", server.target, check=False)
    assert zero.returncode == 2 and "argument -k: must be from 1 to 1000, got 0" in zero.stderr
    # A bad count is the command line's mistake, said once, not blamed on each image.
    zero = pictor("classify", str(image), str(image), "--top-k", "0", "--target", server.target, check=False)
    assert zero.returncode == 2 and "argument --top-k: must be from 1 to 1000, got 0" in zero.stderr
    assert str(image) not in zero.stderr
    many = pictor("classify", str(image), "--neighbors", "1001", "--target", server.target, check=False)
    assert many.returncode == 2 and "argument --neighbors: must be from 0 to 1000, got 1001" in many.stderr


def test_readme_python_example_runs(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### From Python"):readme.index("### Docker")]
    blocking, asyncio_code = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "photo.jpg").write_bytes(drawn_image(3, fmt="JPEG"))
    monkeypatch.chdir(tmp_path)  # where the example's photo.jpg is
    exec(blocking.replace("localhost:50051", server.target), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 + 1 and out[-1] == "cam1/0001.jpg tulips"  # 3 labels, no tulips yet, then the added item
    with PictorClient(server.target) as client:
        assert client.info().index_size == 12  # deleted again
    exec(asyncio_code.replace("localhost:50051", server.target), {})  # noqa: S102
    assert capsys.readouterr().out.splitlines() == [out[0].rsplit(" ", 1)[0]] * 2  # each image's top label


def test_server_refuses_to_start_without_index(tmp_path: Path) -> None:
    r = pictor("serve", "--index", str(tmp_path / "missing"), "--port", "0", check=False)
    assert r.returncode == 2
    assert "pictor index" in r.stderr
    (tmp_path / "pictor.toml").write_text("")
    r = pictor("serve", "--index", str(tmp_path / "pictor.toml"), "--port", "0", check=False)
    assert r.returncode == 2 and "pictor.toml is a file, not an index" in r.stderr  # not "does not exist"


def test_server_refuses_a_port_in_use_or_out_of_range(server: ServerProcess, built_index: Path) -> None:
    # Without SO_REUSEPORT off, this second server would share the port and half the calls.
    r = pictor("serve", "--index", str(built_index), "--port", str(server.port), check=False)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in r.stderr
    r = pictor("serve", "--index", str(built_index), "--port", "70000", check=False)
    assert r.returncode == 2 and "port must be between 0 (any free port) and 65535, got 70000" in r.stderr


def test_a_busy_port_is_refused_before_loading_and_a_failed_load_frees_the_port(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # The index does not exist either: the port is checked first, before any loading. On
        # 0.0.0.0 gRPC alone bound beside the other listener, which then kept 127.0.0.1's calls.
        for host in ("127.0.0.1", "0.0.0.0", "localhost"):
            with pytest.raises(InvalidRequestError, match=f"cannot listen on {host}:"):
                create_server(ServerSettings(index=missing, host=host, port=busy.getsockname()[1]))
    for port in (free_port(), 0):
        with pytest.raises(InvalidRequestError, match="cannot listen on 192.0.2.1:.*: 192.0.2.1 is not an address of this machine"):
            create_server(ServerSettings(index=missing, host="192.0.2.1", port=port))  # TEST-NET-1
    with pytest.raises(InvalidRequestError, match="no.such.host.invalid does not resolve to an address"):
        create_server(ServerSettings(index=missing, host="no.such.host.invalid", port=0))
    for short, full in (("0", "0.0.0.0"), ("127.1", "127.0.0.1")):  # the resolver's, not gRPC's (its own error line)
        with pytest.raises(InvalidRequestError, match=rf"{short} is short for the IPv4 address {full}, which gRPC "
                                                      rf"takes only written in full: --host {full}"):
            create_server(ServerSettings(index=missing, host=short, port=0))
    for bad in ("not..a..host", "x" * 64 + ".example"):  # (Python's IDNA codec raised UnicodeError: a traceback)
        with pytest.raises(InvalidRequestError, match=f"cannot listen on {bad}:0: {bad} is not a valid host name"):
            create_server(ServerSettings(index=missing, host=bad, port=0))
    try:
        with socket.socket(socket.AF_INET6) as any6:
            any6.bind(("::", 0))
    except OSError:
        pass  # no IPv6 here
    else:  # an IPv6 host without brackets is bound as [::]:port (gRPC read ':::port' as a name)
        with pytest.raises(NotFoundError, match="does not exist"):  # bound, then the index is missing
            create_server(ServerSettings(index=missing, host="::", port=0))
    with pytest.raises(NotFoundError, match="does not exist"):  # brackets around IPv4 are taken off
        create_server(ServerSettings(index=missing, host="[127.0.0.1]", port=0))
    if socket.has_ipv6:  # gRPC takes localhost as both loopbacks, so one held on ::1 is in use too
        with socket.socket(socket.AF_INET6) as busy6:
            try:
                busy6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                busy6.bind(("::1", 0))
            except OSError:
                pass  # no IPv6 loopback here
            else:
                busy6.listen()
                for host in ("localhost", "LOCALHOST"):
                    with pytest.raises(InvalidRequestError, match="the port is in use on ::1"):
                        create_server(ServerSettings(index=missing, host=host, port=busy6.getsockname()[1]))
    assert "add_port" not in capfd.readouterr().err  # gRPC's own log line ("Failed to add port")
    port = free_port()
    with pytest.raises(NotFoundError, match="does not exist"):
        create_server(ServerSettings(index=missing, port=port))
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # raises if the failed server still held it


def test_a_server_that_cannot_start_a_thread_exits_instead_of_hanging() -> None:
    """Under `ulimit -v`, gRPC's start failed half way (no thread for it) after a failed load:
    the process never exited, deaf to SIGTERM, as its teardown waited on that server."""
    script = """
import sys, threading
from pictor.cli import main
from pictor.server import app
def failed_load(settings):
    raise RuntimeError("load failed")
def no_thread(self):
    raise RuntimeError("can't start new thread")
app.Engine.load = failed_load
threading.Thread.start = no_thread
sys.exit(main(["serve", "--index", "unused", "--port", "0"]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("pictor serve: error: cannot start the gRPC server: can't start new thread (out of "
                               "memory or of processes?")
    assert r.stderr.rstrip().endswith("loading had failed before it: RuntimeError: load failed")


def test_sigterm_while_loading_ends_the_server_as_ctrl_c_does(built_index: Path) -> None:
    """As a container's PID 1 a process has no default action for SIGTERM: `docker stop`
    during a long load waited out its grace period. Once serving, SIGTERM drains (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "pictor.cli", "serve", "--index", str(built_index),
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "opened:" in line:  # the index is loaded; the backbone is loading
            proc.send_signal(signal.SIGTERM)
            break
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # (seen once on a loaded machine): what was it doing?
        proc.kill()
        raise AssertionError(f"not ended 60 s after SIGTERM; its log:\n{proc.communicate()[1]}") from None
    assert proc.returncode == 130 and "pictor serve: interrupted" in err and "serving" not in err
    server = ServerProcess(built_index).start()
    assert server.stop() == 0 and "stopped" in server.read_log()


def test_client_refuses_what_would_not_reach_the_server_as_asked() -> None:
    with pytest.raises(InvalidRequestError, match="target 'localhost:99999': port must be a number between 1 and 65535"):
        PictorClient("localhost:99999")  # gRPC would silently try another port
    with pytest.raises(InvalidRequestError, match="target '56813': a number alone is no host; give host:port, "
                       "e.g. localhost:56813"):
        PictorClient("56813")  # was "cannot reach 56813:50051 ... hostname lookup failed"
    with pytest.raises(InvalidRequestError, match="timeout must be more than 0 seconds, got 0"):
        PictorClient("localhost:50051", timeout=0)
    # gRPC failed every call at once when a deadline that large overflowed: none instead.
    for endless in (None, math.inf, 1e12):
        assert PictorClient("localhost:50051", timeout=endless).timeout is None
    with pytest.raises(InvalidRequestError, match="target is empty"):
        PictorClient("")
    with pytest.raises(InvalidRequestError, match="without http://"):
        PictorClient("http://localhost:50051")
    # A list is checked whole before the stream opens: its bad 101st item writes nothing (here
    # nothing listens, so without the check the refused connection would be the error).
    items = [UpsertItem(key=f"v/{i}", vector=[1.0]) for i in range(100)]
    with PictorClient(f"127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(
            InvalidRequestError, match="item 'v/bad': attributes map text to text"):
        client.upsert([*items, UpsertItem(key="v/bad", vector=[1.0], attributes={"n": 3})])  # type: ignore[dict-item]
    with PictorClient("[::1]:50051") as client, pytest.raises(
            InvalidRequestError, match="k must be between 1 and 1000, got 100000000000"):
        client.search(key="a", k=10**11)
    with PictorClient("[::1]:50051") as client, pytest.raises(
            InvalidRequestError, match="nprobe must be between 0 and 65536, got -1"):
        client.search(key="a", nprobe=-1)
    with PictorClient("[::1]:50051") as client, pytest.raises(
            InvalidRequestError, match="ef_search must be between 0 and 65536, got 65537"):
        client.search(key="a", ef_search=65537)  # the server's limit: it would refuse it too
    # Arguments of the wrong type are refused as what they are, not as Python's TypeError.
    with pytest.raises(InvalidRequestError, match=r"timeout must be a number of seconds or None, got '5' \(str\)"):
        PictorClient("localhost:50051", timeout="5")  # type: ignore[arg-type]
    with PictorClient("[::1]:50051") as client:
        for k in ("3", 2.5, None, True):
            with pytest.raises(InvalidRequestError, match=rf"k must be a whole number, got {re.escape(repr(k))}"):
                client.search(key="a", k=k)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"top_k must be a whole number, got 2.0 \(float\)"):
            client.classify(b"x", top_k=2.0)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="^attributes map text to text, got 'batch': 2; write numbers as text"):
            client.search(key="a", attributes={"batch": 2})  # type: ignore[dict-item]
        with pytest.raises(InvalidRequestError, match=r"attributes must map text to text \(a dict\), got list"):
            client.list_items(attributes=["batch=2"])  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"got a single UpsertItem; for one item, write \[item\]"):
            client.upsert(UpsertItem(key="a", vector=[1.0]))  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"images must be a list, got a single float"):
            client.embed(2.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="vectors must be True or False, got 1"):
            client.get(["a"], vectors=1)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="service must be text, got int"):
            client.health(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="target must be text, host:port, got NoneType"):
        PictorClient(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="max_message_mb must be a whole number between 1 and 2047, got '3'"):
        PictorClient("localhost:50051", max_message_mb="3")  # type: ignore[arg-type]
    # An image no request can carry is refused by its size, before it is copied: protobuf fails
    # without saying why on one over 2 GB (after copying it twice).
    huge = np.zeros(3 * 2**30, np.uint8).data  # a memoryview; pages never touched take no memory
    with PictorClient("127.0.0.1:9") as client:
        with pytest.raises(ResourceExhaustedError, match=r"^a request of 3072\.00 MB is over this client's 64 MB limit"):
            client.classify(huge)
        with pytest.raises(ResourceExhaustedError, match=r"^item 'k' \(item 0, counting from 0\): a request of 3072\.00"):
            client.upsert([UpsertItem(key="k", image=huge)])
        with pytest.raises(ResourceExhaustedError, match=r"^2 images together: a request of 80\.00 MB is over"):
            client.embed([bytes(40 * 2**20), bytes(40 * 2**20)])
    # Nothing listens: the connection was refused, so nothing can have been written.
    with PictorClient(f"127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(
            ServerUnavailableError, match="cannot reach a Pictor server") as refused:
        client.upsert([UpsertItem(key="a", vector=[1.0])])
    assert "may have been written" not in str(refused.value)
    with PictorClient(f"127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(
            ServerUnavailableError, match="cannot reach a Pictor server") as refused:
        client.delete(["a"])
    assert "may have been applied" not in str(refused.value)
    # Something listens but never answers: a delete past the deadline may have been applied.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with PictorClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as client, pytest.raises(
                ServerUnavailableError, match="within the timeout of 0.5 s.*the delete may have been applied"):
            client.delete(["a"])
    # A host without a port means Pictor's port (gRPC would use 443); schemes are gRPC's.
    targets = []
    for t in ("localhost", "[::1]", "10.0.0.2:7000", "unix:/tmp/s"):
        with PictorClient(t) as client:
            targets.append(client.target)
    assert targets == ["localhost:50051", "[::1]:50051", "10.0.0.2:7000", "unix:/tmp/s"]
    # Usage errors, not "cannot reach": gRPC failed to parse them only when calling.
    for bad in ("localhost:", "localhost:abc", "[::1]:abc", "localhost:\uff10\uff11"):
        with pytest.raises(InvalidRequestError, match=f"target {re.escape(repr(bad))}: port must be a number between 1 and 65535"):
            PictorClient(bad)
    for bad, why in ((":50051", "give host:port"), (" localhost:1", "give host:port"),
                     ("user@localhost:1", "give host:port"), ("grpc://localhost:1", "give host:port without grpc://"),
                     ("::1:56810", "put an IPv6 address in brackets"), ("[1.2.3.4]:5", "give host:port")):
        with pytest.raises(InvalidRequestError, match=f"target {re.escape(repr(bad))}: {why}"):
            PictorClient(bad)  # quoted: " localhost:1" read as "target  localhost:1"
    with PictorClient("::1") as client:  # gRPC would have called port 443
        assert client.target == "[::1]:50051"
    for scheme_target in ("unix-abstract:pictor", "ipv4:127.0.0.1:7000", "xds:///pictor"):  # gRPC's own
        with PictorClient(scheme_target) as client:
            assert client.target == scheme_target
    client = PictorClient("localhost:1")
    with pytest.raises(InvalidRequestError, match="an image must be the file's bytes, got str"):
        client.classify("photo.jpg")  # type: ignore[arg-type]
    # A lone string would be sent as its characters: "abc" would delete keys a, b and c.
    with pytest.raises(InvalidRequestError, match=r"keys must be a list, got a single str; for one key, write \[key\]"):
        client.delete("photos/a.jpg")
    with pytest.raises(InvalidRequestError, match="labels must be a list, got a single str"):
        client.search(key="a", labels="daisy")
    with pytest.raises(InvalidRequestError, match="images must be a list, got a single bytes"):
        client.embed(b"\x89PNG")  # type: ignore[arg-type]  # the mistake under test: bytes are ints, not images
    with pytest.raises(InvalidRequestError, match=r"keys: '\\xff' is not UTF-8 text"):
        client.delete(["\udcff"])  # a lone surrogate, as os.fsdecode makes of a non-UTF-8 name
    with pytest.raises(InvalidRequestError, match=r"the key: '\\xff' is not UTF-8 text"):
        client.search(key="\udcff")
    with pytest.raises(InvalidRequestError, match="a vector must be a list, got a single bytes"):
        client.search(vector=b"\x00\x01")  # would be sent as the numbers 0 and 1
    client.close()
    for call in (client.info, lambda: client.embed([]), lambda: client.upsert([]), lambda: client.delete([]),
                 lambda: client.get([])):  # also where there is nothing to send
        with pytest.raises(InvalidRequestError, match="this PictorClient is closed"):
            call()


def test_calls_are_bounded_and_work_for_a_caller_gone_is_not_written(built_index: Path) -> None:
    server = ServerProcess(built_index, "--workers", "2").start()
    try:
        # An open Upsert stream holds a handler thread: with 2, one stream at a time, so a slow
        # streaming client leaves the other thread to searches and health checks.
        release = threading.Event()
        with PictorClient(server.target, timeout=30) as client, ThreadPoolExecutor(1) as pool:
            slow = open_held_stream(client, pool, "slow/0", release)
            with PictorClient(server.target, max_attempts=1) as once, pytest.raises(
                    ResourceExhaustedError, match=r"1 stream is open already \(Upsert or reflection"):
                once.upsert([UpsertItem(key="slow/1", vector=[1.0] * 1280)])
            assert client.health() == "SERVING" and client.info().index_size == 12
            release.set()
            assert slow.result() == (1, 0)
            client.delete(["slow/0"])
        with PictorClient(server.target) as client:
            with pytest.raises(InvalidRequestError, match="at most 256 images per call, got 257"):
                client.embed([drawn_image(0)] * 257)
            both = UpsertItem(key="both", image=drawn_image(1), vector=[0.1] * 1280)
            with pytest.raises(InvalidRequestError, match="'both' has both an image and a vector"):
                client.upsert([both])
            before = client.info().index_size
        # 64 images take the CPU seconds to embed; the client gives up after 0.3 s. The server
        # must not write them after the caller was told the call failed.
        items = [UpsertItem(key=f"late/{i}", image=drawn_image(100 + i, size=224)) for i in range(64)]
        with PictorClient(server.target, timeout=0.3) as impatient:
            try:
                impatient.upsert(items)
                acknowledged = True
            except DeadlineExceededError as e:
                assert "within the timeout of 0.3 s" in str(e)
                # (all 64 and the stream's end sent, or too few of them for anything to be written)
                assert re.search(r"(some of the 64 items sent may have been written .*: sending them again is safe"
                                 r"|none of the \d+ items sent was written)", str(e)), str(e)
                acknowledged = False
        with PictorClient(server.target) as client:
            def classified() -> bool:  # refused while the upsert's stream holds a thread of the 2
                try:
                    client.classify(drawn_image(2))
                    return True
                except ResourceExhaustedError:
                    return False

            wait_until(classified, poll=0.1)
            after = client.info().index_size
        assert after == (before + 64 if acknowledged else before)
    finally:
        server.stop()


def test_concurrent_calls_share_a_forward_pass_and_get_their_own_answers(built_index: Path) -> None:
    """Calls that come while the model runs are batched into its next passes (--batch-size images
    at most), and each gets the answer it gets alone."""
    settings = ServerSettings(index=str(built_index), port=0, workers=8, batch_size=4, device="cpu",
                              precision="fp32")
    server, port, engine = create_server(settings)
    passes: list[int] = []
    engine.batcher.on_pass = passes.append
    server.start()
    try:
        images = [drawn_image(i) for i in range(4)]
        with PictorClient(f"localhost:{port}", timeout=60) as client, ThreadPoolExecutor(4) as pool:
            alone = [client.classify(image) for image in images]
            vectors = client.embed(images[:2])
            assert passes == [1, 1, 1, 1, 2]
            with engine.batcher.lock:  # a pass that takes long: the calls queue behind it, in this order
                calls: list[Future[Any]] = []
                sent: list[Callable[[], Any]] = [*(partial(client.classify, image) for image in images[:3]),
                                                 partial(client.embed, images[:2])]
                for queued, call in enumerate(sent, start=1):
                    calls.append(pool.submit(call))
                    wait_until(lambda n=queued: len(engine.batcher._waiting) == n, timeout=30, poll=0.01)  # type: ignore[misc]
            together = [f.result(timeout=60) for f in calls[:3]]
            assert np.allclose(calls[3].result(timeout=60), vectors, atol=1e-4)
        assert passes[5:] == [3, 2]  # 3 images classified in one pass; the 2 embedded would make it 5
        for mine, theirs in zip(together, alone[:3], strict=True):
            assert [label.name for label in mine.labels] == [label.name for label in theirs.labels]
            assert np.allclose([label.score for label in mine.labels], [label.score for label in theirs.labels],
                               atol=1e-4)
    finally:
        server.stop(None)
        engine.close()


def test_calls_that_run_the_model_leave_a_thread_for_health_checks(
    built_index: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Classify calls waiting for the forward pass held every handler thread, and health checks
    queued behind them for seconds: one thread is kept, and a call beyond is refused at once."""
    from pictor.server import app

    made: list[app.HandlerThreads] = []

    class Recorded(app.HandlerThreads):
        def __init__(self, workers: int) -> None:
            super().__init__(workers)
            made.append(self)

    monkeypatch.setattr(app, "HandlerThreads", Recorded)
    settings = ServerSettings(index=str(built_index), port=0, workers=4, device="cpu", precision="fp32")
    server, port, engine = create_server(settings)
    server.start()
    try:
        # Sent once: a refused call is not sent again (see the next test).
        with PictorClient(f"localhost:{port}", timeout=30, max_attempts=1) as client, ThreadPoolExecutor(3) as pool:
            with engine.batcher.lock:  # a forward pass that takes long
                waiting = [pool.submit(client.classify, drawn_image(i)) for i in range(3)]
                wait_until(lambda: made[0]._waiting_calls >= 3, timeout=30, poll=0.01)
                with pytest.raises(ResourceExhaustedError, match="the server is busy: 3 calls that wait for the model or a write"):
                    client.classify(drawn_image(9))
                with pytest.raises(ResourceExhaustedError, match="nothing was searched"):
                    client.search(image=drawn_image(9))
                with pytest.raises(ResourceExhaustedError, match="nothing was written"):
                    client.upsert([UpsertItem(key="busy", vector=[1.0] * 1280)])
                first = client.list_items(limit=1)[0][0].key
                with pytest.raises(ResourceExhaustedError, match="nothing was deleted"):
                    client.delete([first])  # it would wait behind a write (a rebuild) holding a thread
                assert client.health() == "SERVING" and client.info().index_size == 12
                assert client.search(key=first, k=1)[0].key == first
            assert all(f.result(timeout=60).labels for f in waiting)
        assert made[0]._waiting_calls == 0
        # Refusals are expected under load: one line says how many, at most every 10 s, not one each.
        made[0].flush_refusals()  # as the server's stop does
        busy = [r for r in caplog.records if "busy" in r.getMessage()]
        assert [(r.levelname, r.getMessage()[:51]) for r in busy] == [
            ("WARNING", "calls refused as busy since the last such line: 1 ("),
            ("WARNING", "calls refused as busy since the last such line: 3 (")]
    finally:
        server.stop(None)
        engine.close()


def test_a_call_whose_deadline_passes_while_it_waits_frees_its_thread_before_the_pass(built_index: Path) -> None:
    """A caller gone while its call waits for the model (its deadline passed behind a long pass)
    frees its thread at once, not when the pass it waited for ends: a busy server takes the next
    call instead of refusing it."""
    from pictor.server.app import HandlerThreads

    threads = HandlerThreads(4)  # 3 calls may wait for the model
    settings = ServerSettings(index=str(built_index), port=0, workers=4, device="cpu", precision="fp32",
                              max_queue_delay_ms=2.5)
    server, port, engine = create_server(settings, threads)
    assert engine.batcher.max_delay_s == 0.0025  # (--max-queue-delay-ms reaches the batcher)
    passes: list[int] = []
    engine.batcher.on_pass = passes.append
    server.start()
    try:
        with PictorClient(f"localhost:{port}", timeout=60, max_attempts=1) as patient, \
                PictorClient(f"localhost:{port}", timeout=1, max_attempts=1) as hasty, ThreadPoolExecutor(3) as pool:
            with engine.batcher.lock:  # a forward pass that takes long
                waiting = [pool.submit(patient.classify, drawn_image(0))]
                # The patient call first, to run the pass (a runner waits for the model, gone or not).
                wait_until(lambda: engine.batcher._running, timeout=30, poll=0.01)
                waiting.append(pool.submit(hasty.classify, drawn_image(1)))
                wait_until(lambda: threads._waiting_calls == 2, timeout=30, poll=0.01)
                with pytest.raises(DeadlineExceededError):
                    waiting[1].result(timeout=30)
                wait_until(lambda: threads._waiting_calls == 1, timeout=5, poll=0.01)  # the pass still runs
                waiting[1:] = [pool.submit(patient.classify, drawn_image(i)) for i in (2, 3)]
                wait_until(lambda: threads._waiting_calls == 3, timeout=30, poll=0.01)  # none refused as busy
            assert all(f.result(timeout=60).labels for f in waiting)
        assert sum(passes) == 3  # the gone call's image was never run
    finally:
        server.stop(None)
        engine.close()


def test_a_reply_over_the_message_limit_says_how_to_ask_for_less(built_index: Path) -> None:
    server = ServerProcess(built_index, "--max-message-mb", "2").start()
    rng = np.random.default_rng(0)
    # 40 items of 60 KB attributes each (within the 64 KB limit) make replies of up to 2.4 MB.
    items = [UpsertItem(key=f"big/{i}", vector=rng.standard_normal(1280).tolist(), attributes={"note": "x" * 60_000})
             for i in range(40)]
    try:
        with PictorClient(server.target) as client:
            client.upsert(items)
            query = items[0].vector
            assert len(client.search(vector=query, k=30)) == 30  # under 2 MB
            # Not gRPC's RESOURCE_EXHAUSTED "Sent message larger than max", which also means "busy".
            with pytest.raises(InvalidRequestError,
                               match=r"a reply of 2\.\d+ MB is over this server's 2 MB limit; ask for a smaller k"):
                client.search(vector=query, k=52)
            with pytest.raises(InvalidRequestError, match="a reply of .*; ask for fewer keys, or no vectors"):
                client.get([i.key for i in items], vectors=True)
            assert client.info().index_size == 12 + 40  # still serving
            # List ends a page early where it would be over the limit, and a listing goes on.
            first, after = client.list_items(limit=1000)
            assert 12 < len(first) < 52 and after == first[-1].key
            listed = [item.key for item in client.iter_items()]
            assert listed == sorted(listed) and len(listed) == 52 and {i.key for i in items} <= set(listed)
            # A request over the server's limit is the request's size, not a reply's; refused by
            # the server itself, not by gRPC, whose refusal PictorClient would resend 5 times.
            with pytest.raises(ResourceExhaustedError, match=r"a request of 3\.\d+ MB is over this server's 2 MB limit; .*smaller image files") as big:
                client.classify(drawn_image(1) + b"\0" * 3 * 2**20)
            assert not isinstance(big.value, ServerBusyError)
            assert server.read_log().count("Classify -> RESOURCE_EXHAUSTED: a request of 3.") == 1
            # So is an Upsert item over it, after the items before it (written as the proto says).
            with pytest.raises(ResourceExhaustedError, match="over this server's 2 MB limit"):
                client.upsert([UpsertItem(key="small", vector=query),
                               UpsertItem(key="huge", image=drawn_image(1) + b"\0" * 3 * 2**20)])
            assert server.read_log().count("Upsert -> RESOURCE_EXHAUSTED: a request of 3.") == 1
        with PictorClient(server.target, max_message_mb=1) as small, pytest.raises(
                ResourceExhaustedError, match=r"a reply of 1\.\d+ MB is over this client's 1 MB limit; .*ask for less"):
            small.search(vector=query, k=30)
    finally:
        server.stop()
    # An Embed reply's size is known before any image is decoded: refused then (not after 12 s of
    # decoding 256 images), so these undecodable bytes are never looked at.
    server = ServerProcess(built_index, "--max-message-mb", "1").start()
    try:
        with PictorClient(server.target) as client, pytest.raises(
                InvalidRequestError, match=r"a reply of 1\.25 MB is over this server's 1 MB limit; ask for fewer images"):
            client.embed([b"not an image"] * 256)
    finally:
        server.stop()


def test_a_busy_server_is_exit_code_4_after_the_client_resent_the_call(built_index: Path) -> None:
    """With --workers 2 an open Upsert stream leaves no thread for a Classify: the client sends
    it 5 times, then the image is reported and the exit code is as for an unreachable server
    (scripts try again later)."""
    server = ServerProcess(built_index, "--workers", "2").start()
    release = threading.Event()
    try:
        with PictorClient(server.target, timeout=30) as client, ThreadPoolExecutor(1) as pool:
            upload = open_held_stream(client, pool, "held", release)
            image = DATA / "daisy.jpg"
            busy = pictor("classify", str(image), "--target", server.target, check=False)
            assert busy.returncode == 4, busy.stderr
            assert re.fullmatch(rf"pictor classify: error: {image}: the server is busy: .* \(refused 5 times: the client sent "
                                r"it again after random waits\) \(RESOURCE_EXHAUSTED\)\n", busy.stderr)
            release.set()
            assert upload.result(timeout=30) == (1, 0)
        assert pictor("classify", str(image), "--target", server.target).returncode == 0
    finally:
        release.set()
        server.stop()


def test_a_quiet_upsert_stream_is_ended_and_frees_its_slot(built_index: Path) -> None:
    from pictor.errors import DeadlineExceededError

    # One stream slot; a client that opens a stream without a deadline and stops sending
    # would otherwise hold it (and a handler thread) until it disconnects.
    server = ServerProcess(built_index, "--workers", "2", "--upsert-idle-timeout", "1").start()
    release = threading.Event()

    def steady() -> Iterator[UpsertItem]:  # slower in all than the limit, never quiet that long
        for i in range(5):
            time.sleep(0.4)
            yield UpsertItem(key=f"steady/{i}", vector=[float(i + 1)] * 1280)

    try:
        with PictorClient(server.target, timeout=20) as client:
            with pytest.raises(TimeoutError) as ended:  # a DeadlineExceededError, caught as the builtin too
                client.upsert(held_open("quiet/0", release))
            assert isinstance(ended.value, DeadlineExceededError)
            assert re.fullmatch(r"the upsert stream sent nothing for 1 s and was ended: send each message within that "
                                r"time .*; nothing of this stream was written \(DEADLINE_EXCEEDED\)", str(ended.value))
            release.set()
            assert client.upsert(steady()) == (5, 0)  # the slot is free again
            assert client.info().index_size == 12 + 5  # the quiet stream's unfinished chunk is not written
            # An item is named by its place in the stream, not in its chunk of 64.
            keyed = [UpsertItem(key="" if i == 67 else f"pos/{i}", vector=[float(i + 1)] * 1280) for i in range(70)]
            with pytest.raises(InvalidRequestError, match=r"item 67 \(counting from 0\) has no key; the first 64 items of the stream were written"):
                client.upsert(keyed)
            with pytest.raises(InvalidRequestError, match="item 'hollow': vector has 0 values"):
                client.upsert([UpsertItem(key="hollow", vector=[])])  # a vector, empty: not "neither"
            # A reflection stream (grpcurl opens one per use) takes the same slot, and ends when
            # quiet: eight idle ones held every handler thread of a default server.
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            quiet_tool = threading.Event()

            def ask_then_wait() -> Iterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                quiet_tool.wait(30)

            # Sent once: PictorClient would send it again, and the reflection stream ends within 1 s
            # (connected beforehand, so that the second holds no more than the call).
            with grpc.insecure_channel(server.target) as channel, PictorClient(
                    server.target, timeout=20, max_attempts=1) as once:
                once.health()
                replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask_then_wait())
                names = {s.name for s in next(replies).list_services_response.service}
                assert "pictor.v1.Pictor" in names
                with pytest.raises(ResourceExhaustedError, match=r"1 stream is open already \(Upsert or reflection"):
                    once.upsert([UpsertItem(key="refused", vector=[1.0] * 1280)])
                assert client.health() == "SERVING" and client.info().index_size == 12 + 5 + 64
                with pytest.raises(grpc.RpcError) as tool_ended:
                    next(replies)
                assert tool_ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "the reflection stream sent nothing for 1 s" in tool_ended.value.details()
                quiet_tool.set()
            assert client.upsert([UpsertItem(key="after", vector=[1.0] * 1280)]) == (1, 0)  # the slot is free
    finally:
        release.set()
        server.stop()


def test_streams_cut_off_by_their_deadline_or_malformed_write_and_log_nothing(built_index: Path) -> None:
    from pictor.errors import DeadlineExceededError

    server = ServerProcess(built_index).start()
    try:
        with PictorClient(server.target, timeout=10) as client:
            # gRPC ends a stream cut off by its deadline as if its client had closed it, and
            # marks the call ended a moment later: 1 in 10 such streams had its 5 items written.
            # (Without the fix this loop failed about 2 times in 3.)
            def five_then_stall(attempt: int, stalled: threading.Event) -> Iterator[UpsertItem]:
                yield from (UpsertItem(key=f"cut/{attempt}/{i}", vector=[float(i + 1)] * 1280) for i in range(5))
                stalled.wait(10)

            for attempt in range(12):
                stalled = threading.Event()
                with PictorClient(server.target, timeout=0.5) as hasty, pytest.raises(DeadlineExceededError):
                    hasty.upsert(five_then_stall(attempt, stalled))
                stalled.set()
            time.sleep(0.3)
            assert client.info().index_size == 12
            # A bad item fails its stream as it arrives, though the client keeps the stream open:
            # it was checked only once its chunk of 64 was full (here: never, so the client heard
            # only that its stream went quiet, after a minute).
            held = threading.Event()

            def bad_then_stall() -> Iterator[UpsertItem]:
                yield UpsertItem(key="", vector=[1.0] * 1280)
                held.wait(10)

            started = time.monotonic()
            with pytest.raises(InvalidRequestError, match=r"item 0 \(counting from 0\) has no key"):
                client.upsert(bad_then_stall())
            held.set()
            assert time.monotonic() - started < 5
            # Request bytes that are not a reflection request: INVALID_ARGUMENT, as for Pictor's
            # own methods, not INTERNAL with a traceback in the log per request.
            with grpc.insecure_channel(server.target) as channel:
                raw = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                            request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.RpcError) as malformed:
                    list(raw(iter([b"\xff"]), timeout=10))
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in malformed.value.details()
            assert client.health() == "SERVING"
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


def test_search_by_key_puts_the_item_first_even_where_hnsw_misses_it(gallery: Path, tmp_path: Path) -> None:
    from pictor.core.store import Filter, Item, SearchParams
    from pictor.server.engine import Engine

    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out), "--index-type", "HNSW32", "--no-progress")
    engine = Engine.load(ServerSettings(index=str(out), device="cpu", precision="fp32"))
    try:
        vecs = np.random.default_rng(0).standard_normal((300, 1280)).astype(np.float32)
        keys = [f"r{i}" for i in range(300)]
        engine.upsert([Item(key=k, label=("even", "odd")[i % 2]) for i, k in enumerate(keys)],
                      [None] * len(keys), vecs.tolist())
        narrow = SearchParams(ef_search=1)
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        found = [hits[0].key for hits in engine.store.search(unit, 1, params=narrow)]
        assert found != keys  # the narrow graph search misses some items
        for key in keys:
            hits = engine.search(key=key, k=3, params=narrow)
            assert (hits[0].key, len(hits), hits.keys.count(key)) == (key, 3, 1)
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        # A filter that leaves the item out is obeyed.
        hits = engine.search(key="r1", k=3, filter=Filter(labels=("even",)))
        assert "r1" not in hits.keys and {h.label for h in hits} == {"even"}
    finally:
        engine.close()


def test_the_client_sends_busy_refusals_again_and_nothing_else(
    built_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PictorClient resends a call refused as busy (gRPC's retry policy, with backoff), large
    ones too, and not one refused for any other reason: the server marks those "do not resend"."""

    server, port, engine = create_server(ServerSettings(index=str(built_index), port=0, device="cpu"))
    server.start()
    calls: list[float] = []
    refusals: list[Exception] = []

    def refusing(name: str) -> None:
        real = getattr(engine, name)

        def method(*args: object, **kwargs: object) -> object:
            calls.append(time.monotonic())
            if refusals:
                raise refusals.pop(0)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, name, method)

    refusing("info")
    refusing("embed")
    target = f"localhost:{port}"
    try:
        with PictorClient(target, timeout=30) as client:
            refusals[:] = [ServerBusyError("the server is busy")] * 2
            assert client.info().index_size == 12 and len(calls) == 3  # two refusals, then answered
            assert calls[2] - calls[0] < 3.5  # within the backoff: at most 0.6 + 1.2 s of random wait, and round trips
            # gRPC keeps only 256 KB of a call to resend by default: a photo is larger.
            noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(noise).save(buffer, "PNG")
            assert buffer.tell() > 1_000_000
            calls.clear()
            refusals[:] = [ServerBusyError("the server is busy")] * 2
            assert len(client.embed([buffer.getvalue()])) == 1 and len(calls) == 3

            calls.clear()
            refusals[:] = [ServerBusyError("the server is busy")] * 9
            with pytest.raises(ServerBusyError, match=r"the server is busy \(refused 5 times: the client sent it "
                                                      r"again after random waits\)"):
                client.info()
            assert len(calls) == 5  # gRPC's cap
            refusals.clear()

        with PictorClient(target, timeout=30) as client:
            calls.clear()
            refusals[:] = [ResourceExhaustedError("the disk is full")]
            with pytest.raises(ResourceExhaustedError, match="the disk is full") as full:
                client.info()
            assert len(calls) == 1 and not isinstance(full.value, ServerBusyError)

        with PictorClient(target, timeout=30, max_attempts=1) as client:
            calls.clear()
            refusals[:] = [ServerBusyError("the server is busy")]
            with pytest.raises(ResourceExhaustedError, match=r"the server is busy \(RESOURCE_EXHAUSTED\)$"):
                client.info()
            assert len(calls) == 1
        with pytest.raises(InvalidRequestError, match="max_attempts must be a whole number from 1 to 5, got 6"):
            PictorClient(target, max_attempts=6)
    finally:
        server.stop(None)
        engine.close()


def test_resend_waits_take_at_most_half_the_timeout() -> None:
    """So a call refused every time says busy, rather than running out of time (5 attempts)."""
    from pictor.client.client import _retry_policy

    for timeout, first in ((None, 0.5), (60.0, 0.5), (5.0, 0.125)):
        policy = json.loads(_retry_policy(5, timeout))["methodConfig"][0]["retryPolicy"]
        waits = [min(float(policy["initialBackoff"][:-1]) * 2**n, float(policy["maxBackoff"][:-1])) for n in range(4)]
        # gRPC's core jitters each wait by +-20%
        assert waits[0] == first and (timeout is None or 1.2 * sum(waits) <= timeout / 2)


def test_an_upsert_that_fails_unexpectedly_says_what_it_wrote(
    built_index: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is not Pictor's (here the disk, as sqlite3 reports it) after a chunk of the
    stream was written: INTERNAL, and the reply says what is durable."""
    settings = ServerSettings(index=str(built_index), port=0, workers=4, device="cpu", precision="fp32")
    server, port, engine = create_server(settings)
    real, chunks = engine.upsert, []

    def second_chunk_fails(*args: Any, **kwargs: Any) -> Any:
        chunks.append(1)
        if len(chunks) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "upsert", second_chunk_fails)
    server.start()
    try:
        with PictorClient(f"localhost:{port}", timeout=30) as client:
            items = [UpsertItem(key=f"x/{i}", vector=[1.0] * 1280) for i in range(UPSERT_CHUNK + 1)]
            with caplog.at_level("ERROR"), pytest.raises(PictorError) as failed:
                client.upsert(items)
            assert str(failed.value) == (f"internal error in /pictor.v1.Pictor/Upsert; see server log; the first {UPSERT_CHUNK} "
                                         "items of the stream were written (INTERNAL)")
            assert "disk I/O error" in caplog.text
            assert len(client.get([f"x/{UPSERT_CHUNK - 1}", f"x/{UPSERT_CHUNK}"])[0]) == 1
    finally:
        server.stop(None)
        engine.close()


def test_an_upsert_cut_off_by_closing_the_client_may_have_been_written(server: ServerProcess) -> None:
    """A call cancelled under the caller (PictorClient.close() on another thread) lost its
    answer: a write's outcome is unknown, and it is no timeout."""
    sent, release = threading.Event(), threading.Event()

    client = PictorClient(server.target, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        upsert = pool.submit(client.upsert, held_open("cut/0", release, sent))
        assert sent.wait(30)
        client.close()
        with pytest.raises(ServerUnavailableError) as cut:
            upsert.result(30)
        release.set()
    assert not isinstance(cut.value, TimeoutError)
    assert re.match(r"the call was cancelled before its answer came \(.*\): this PictorClient was closed "
                    r"\(CANCELLED\); the item sent was not written \(the server writes fewer than 64 items only with "
                    r"the stream's last message, which never went\): send them again", str(cut.value)), str(cut.value)


def test_an_upsert_refused_as_busy_midway_is_sent_again_whole(built_index: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC's own resend of a stream refused after its client began sending lost items from its
    middle (answered as written); PictorClient resends an Upsert itself, every item of it."""
    from pictor.server.limits import HandlerThreads

    class Refusing(HandlerThreads):
        refusals = 0
        refused = 0
        delays = random.Random(0)
        late = 0.0  # seconds before a refusal, else 0-50 ms

        def delay(self) -> float:
            return self.late or self.delays.uniform(0, 0.05)

        def stream(self, refused: str) -> contextlib._GeneratorContextManager[None, None, None]:
            if self.refusals:
                self.refusals -= 1
                self.refused += 1
                time.sleep(self.delay())  # the client may be sending by now
                raise ServerBusyError(f"the server is busy; {refused}")
            return super().stream(refused)

    threads = Refusing(8)
    server, port, engine = create_server(ServerSettings(index=str(built_index), port=0, device="cpu"), threads)
    server.start()
    rng = np.random.default_rng(0)
    try:
        with PictorClient(f"localhost:{port}", timeout=8) as client:  # resent after 0.2 s, then 0.4, 0.8, 1.6
            for n in range(40):  # (gRPC's resend lost an item in about 1 of 40)
                items = [UpsertItem(key=f"r{n}/{i}", vector=rng.standard_normal(1280).tolist()) for i in range(150)]
                threads.refusals, threads.refused = 1, 0
                assert client.upsert(items) == (150, 0) and threads.refused == 1
                assert client.get([it.key for it in items])[1] == []
            threads.refusals = 9
            with pytest.raises(ServerBusyError, match=r"the server is busy; nothing was written \(refused 5 times: "
                                                      r"the client sent it again after random waits\) "
                                                      r"\(RESOURCE_EXHAUSTED\)$"):
                client.upsert(items)
            assert threads.refusals == 4
            # A stream past what the client keeps to resend (its message limit) is not resent, and says so.
            with PictorClient(f"localhost:{port}", timeout=8, max_message_mb=1) as small:
                threads.refusals, threads.late = 1, 1.5
                with pytest.raises(ServerBusyError, match=r"the server is busy; nothing was written \(RESOURCE_EXHAUSTED\); "
                                                          "not sent again: its items so far were over the 1 MB this "
                                                          "client keeps to resend a stream"):
                    small.upsert(iter(items * 2))  # 300 items, 1.5 MB
                threads.refusals, threads.late = 0, 0.0
            # Nothing vanishes unsaid: an answer that counts fewer items than were sent is an error.
            real = engine.upsert

            def one_short(*args: Any, **kwargs: Any) -> Any:
                result = real(*args, **kwargs)  # (the items are there: replaced)
                return dataclasses.replace(result, replaced=result.replaced - 1)

            monkeypatch.setattr(engine, "upsert", one_short)
            with pytest.raises(ServerUnavailableError, match="the server wrote 63 of the 64 items sent: the others "
                                                             "were lost on the way; sending them again is safe"):
                client.upsert(items[:64])
    finally:
        server.stop(None)
        engine.close()


def test_an_upsert_cut_off_by_the_server_stopping_says_so(built_index: Path) -> None:
    """Not "cannot reach": the server was reached, and stopped (past its drain) with the call open."""
    from pictor.server.limits import HandlerThreads

    threads = HandlerThreads(4)
    server, port, engine = create_server(
        ServerSettings(index=str(built_index), port=0, workers=4, device="cpu"), threads)
    server.start()
    release = threading.Event()

    try:
        with PictorClient(f"localhost:{port}", timeout=30) as client, ThreadPoolExecutor(1) as pool:
            upsert = pool.submit(client.upsert, held_open("cut/0", release))
            # the server has begun the stream, not only the client
            wait_until(lambda: threads._streams > 0, timeout=30, poll=0.01)
            server.stop(0)
            with pytest.raises(ServerUnavailableError) as cut:
                upsert.result(30)
            release.set()
        # gRPC ends the call UNAVAILABLE ("Cancelling all calls") or CANCELLED, as the race goes.
        assert re.match(rf"the server at localhost:{port} stopped or cancelled the call while it was open \(.*\) "
                        r"\((UNAVAILABLE|CANCELLED)\); the item sent was not written", str(cut.value)), str(cut.value)
    finally:
        release.set()
        server.stop(None)
        engine.close()


def test_an_upsert_whose_server_died_says_which_items_may_have_been_written(built_index: Path) -> None:
    """SIGKILL of the server under an open stream: the connection was lost (not "cannot reach"),
    and of the 70 items sent only the first whole chunk may have been written."""
    server = ServerProcess(built_index).start()
    sent, release = threading.Event(), threading.Event()

    def items() -> Iterator[UpsertItem]:
        for i in range(UPSERT_CHUNK + 6):
            yield UpsertItem(key=f"k/{i}", vector=[1.0] * 1280)
        sent.set()
        release.wait(30)

    try:
        with PictorClient(server.target, timeout=30) as client, ThreadPoolExecutor(1) as pool:
            upsert = pool.submit(client.upsert, items())
            assert sent.wait(30)
            time.sleep(0.5)  # the server reads them
            server.kill()
            with pytest.raises(ServerUnavailableError) as lost:
                upsert.result(30)
    finally:
        release.set()
        server.stop()
    assert re.match(rf"the connection to the server at {server.target} was lost during the call \(.*\) "
                    r"\(UNAVAILABLE\); the first 64 of the 70 items sent may have been written \(whole chunks of 64; "
                    r"the rest waited for the stream's last message, which never went\)", str(lost.value)), str(lost.value)


def test_a_server_that_says_it_cannot_serve_is_not_called_unreachable(
    built_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNAVAILABLE from the server itself (its index folder deleted while open) keeps the
    server's words: not "cannot reach", no hint about the address, no "may have been written";
    and its health check says NOT_SERVING."""
    import shutil

    from pictor.cli import main

    index = tmp_path / "served"
    shutil.copytree(built_index, index)
    settings = ServerSettings(index=str(index), port=0, workers=4, device="cpu")
    server, port, engine = create_server(settings)
    server.start()
    try:
        shutil.rmtree(index)
        with PictorClient(f"localhost:{port}", timeout=30) as client, pytest.raises(ServerUnavailableError) as gone:
            client.upsert([UpsertItem(key="a", vector=[1.0] * 1280)])
        assert gone.value.server_said
        assert str(gone.value).startswith(f"the folder of index store {index} was deleted while open")
        assert "may have been written" not in str(gone.value)
        image = tmp_path / "a.png"
        image.write_bytes(drawn_image(0))
        assert main(["add", str(image), "--target", f"localhost:{port}"]) == 4
        err = capsys.readouterr().err
        assert "was deleted while open" in err and "cannot reach" not in err and "pictor serve` running" not in err
        # A probe sees it, and restarts the server (searches still answer from memory).
        with PictorClient(f"localhost:{port}", timeout=30) as client:
            assert client.health() == client.health("pictor.v1.Pictor") == "NOT_SERVING"
            assert len(client.search(vector=[1.0] * 1280, k=2)) == 2
        assert main(["health", "--target", f"localhost:{port}"]) == 4
    finally:
        server.stop(None)
        engine.close()


def test_add_sends_one_call_per_chunk_and_says_what_the_calls_before_a_failure_added(
    built_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pictor add` of many images: one Upsert call per chunk of 64, each within --timeout (one
    call spanning them all capped how many a command could add: about 350 in 30 s on 2 cores);
    when a call fails, the message says what the calls before it added."""
    from pictor.cli import main

    (tmp_path / "many").mkdir()
    paths = [tmp_path / "many" / f"{i:02d}.png" for i in range(UPSERT_CHUNK + 6)]
    for i, path in enumerate(paths):
        path.write_bytes(drawn_image(100 + i, size=32))
    server, port, engine = create_server(ServerSettings(index=str(built_index), port=0, workers=4, device="cpu"))
    server.start()
    sizes: list[int] = []
    real_upsert = PictorClient.upsert

    def upsert(client: PictorClient, items: Sequence[UpsertItem]) -> tuple[int, int]:
        if lose_the_second and sizes:
            server.stop(None)
        sizes.append(len(items))
        return real_upsert(client, items)

    monkeypatch.setattr(PictorClient, "upsert", upsert)
    add = ["add", *map(str, paths), "--target", f"localhost:{port}"]
    try:
        lose_the_second = False
        assert main(add) == 0 and sizes == [UPSERT_CHUNK, 6]
        assert capsys.readouterr().out == f"added {len(paths)} new, replaced 0 existing\n"
        lose_the_second, sizes[:] = True, []
        assert main(add) == 4 and sizes == [UPSERT_CHUNK, 6]
        err = capsys.readouterr().err
        # (stopped between calls, or as the second began: either is said, with what came before)
        assert (f"cannot reach a Pictor server at localhost:{port}" in err
                or f"the connection to the server at localhost:{port} was lost during the call" in err)
        assert f"; the calls before this one added the first {UPSERT_CHUNK} of the {len(paths)} images " \
               f"(0 new, {UPSERT_CHUNK} replaced)\n" in err
    finally:
        server.stop(None)
        engine.close()


def test_a_listing_cut_off_says_where_to_go_on(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`pictor list` cut off (the server gone, Ctrl-C) names the last key it printed, and the
    --after that goes on from there, quoted for a shell."""
    from pictor.api import StoredItem
    from pictor.cli import main

    def list_items(client: PictorClient, after: str = "", limit: int = 0, **filter: Any) -> Any:
        if not after:
            return [StoredItem("a.jpg"), StoredItem("-my photos/b.jpg")], "-my photos/b.jpg"
        raise ServerUnavailableError(f"the connection to the server at {client.target} was lost during the call")

    monkeypatch.setattr(PictorClient, "list_items", list_items)
    assert main(["list", "--target", "127.0.0.1:9"]) == 4
    out, err = capsys.readouterr()
    assert out == "a.jpg\n-my photos/b.jpg\n"
    go_on = "--after='-my photos/b.jpg'"
    assert err.startswith("pictor list: error: the connection to the server at 127.0.0.1:9 was lost during the call; "
                          f"the listing stopped after the key printed last: to go on, run it again with {go_on}\n")
    assert shlex.split(go_on) == ["--after=-my photos/b.jpg"]  # as a shell passes it: not an option of its own


def test_classify_of_many_images_keeps_the_answers_it_had_when_the_server_goes(
    built_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server lost (or Ctrl-C) halfway through `pictor classify A B C D --json`: the answers that
    came are printed, the others with an error each, and the message names the image the batch
    stopped at and how many were not asked."""
    from pictor.cli import main

    paths = []
    for i in range(4):
        paths.append(str(path := tmp_path / f"q{i}.png"))
        path.write_bytes(drawn_image(200 + i))
    server, port, engine = create_server(ServerSettings(index=str(built_index), port=0, workers=4, device="cpu"))
    server.start()
    real_classify, calls = PictorClient.classify, []

    def classify(client: PictorClient, image: bytes, **options: Any) -> Any:
        calls.append(image)
        if len(calls) == 3:
            raise KeyboardInterrupt
        if len(calls) == 6:
            server.stop(None)
        return real_classify(client, image, **options)

    monkeypatch.setattr(PictorClient, "classify", classify)
    note = f"; {paths[2]} and the 1 image(s) after it were not classified; the results of the 2 before it are printed\n"
    try:
        for code, why in ((130, "interrupted"), (4, "cannot reach a Pictor server at ")):  # at the third image:
            assert main(["classify", *paths, "--json", "--target", f"localhost:{port}"]) == code  # Ctrl-C, gone
            out, err = capsys.readouterr()
            results = json.loads(out)
            assert [r["image"] for r in results] == paths
            assert all(r["labels"] and "error" not in r for r in results[:2])
            assert results[2]["error"].startswith(f"not classified: {why}")
            assert results[3]["error"].startswith(f"not classified: not sent ({why}")  # never sent: it says so
            assert results[3]["error"].endswith(f" at {paths[2]})")
            assert note in err
    finally:
        server.stop(None)
        engine.close()


def test_a_call_whose_deadline_passed_while_it_waited_for_the_model_is_not_run(
    built_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pictor.errors import DeadlineExceededError

    settings = ServerSettings(index=str(built_index), port=0, workers=4, device="cpu", precision="fp32")
    server, port, engine = create_server(settings)
    runs: list[int] = []
    real = engine.embedder.forward_preprocessed

    def counted(tensors: Sequence[Any], batch_size: int | None = None) -> Any:
        runs.append(len(tensors))
        return real(tensors, batch_size)

    monkeypatch.setattr(engine.embedder, "forward_preprocessed", counted)
    server.start()
    try:
        with PictorClient(f"localhost:{port}", timeout=1, max_attempts=1) as client:
            with engine.batcher.lock:  # a forward pass that outlasts the call's deadline
                with pytest.raises(DeadlineExceededError):
                    client.classify(drawn_image(0))
                # The server's clock for the deadline starts when the call arrives, a little
                # after the client's: the lock is held until it has surely passed there too.
                time.sleep(0.5)
            time.sleep(0.5)  # the call's handler has the forward lock now, and finds its caller gone
            assert runs == []
        with PictorClient(f"localhost:{port}", timeout=30) as client:
            assert client.classify(drawn_image(0)).labels and runs == [1]
    finally:
        server.stop(None)
        engine.close()


def test_calls_whose_caller_has_gone_run_no_model() -> None:
    """Classify, Embed and Search by image check first that the caller still waits (a deadline
    may pass while a call waits for a thread): the engine is never reached here."""
    from pictor.errors import DeadlineExceededError
    from pictor.server import limits, service
    from pictor.server.engine import Engine
    from pictor.v1 import pictor_pb2 as pb

    class Gone:
        def is_active(self) -> bool:
            return False

    gone = cast(grpc.ServicerContext, Gone())
    servicer = service.PictorService(engine=cast(Engine, None), threads=limits.HandlerThreads(4),
                                     upsert_idle_s=1.0, max_reply_bytes=1 << 20)
    for call in (lambda: servicer.Classify(pb.ClassifyRequest(image=b"x"), gone),
                 lambda: servicer.Embed(pb.EmbedRequest(images=[b"x"]), gone),
                 lambda: servicer.Search(pb.SearchRequest(image=b"x"), gone)):
        with pytest.raises(DeadlineExceededError, match="the call ended .* before"):
            call()


def test_an_embed_whose_caller_has_gone_stops_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller is checked before each image is decoded: an Embed of many large images went on
    decoding them all after its deadline (10 slow files: 47 s of CPU after the call ended)."""
    from types import SimpleNamespace

    from pictor.errors import DeadlineExceededError
    from pictor.server import engine as engine_mod

    decoded: list[bytes] = []

    def decode(data: bytes, **_: Any) -> Image.Image:
        decoded.append(data)
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(engine_mod, "decode_image", decode)
    checks = iter([None, None])  # still waiting before the first two images, gone before the third

    def still_wanted() -> None:
        if next(checks, "gone") == "gone":
            raise DeadlineExceededError("the call ended")

    fake = SimpleNamespace(max_pixels=1000, embedder=SimpleNamespace(draft_size=(8, 8), preprocess=lambda im: im))
    with pytest.raises(DeadlineExceededError):
        engine_mod.Engine.forward(cast(Any, fake), [b"a", b"b", b"c", b"d"], still_wanted=still_wanted)
    assert decoded == [b"a", b"b"]


def test_busy_refusals_are_all_counted_in_the_log(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """One line at most every REFUSALS_LOG_EVERY_S: at once, then for the refusals since, when
    the spell ends (a timer), and what is left when the server stops."""
    from pictor.server import limits

    monkeypatch.setattr(limits, "REFUSALS_LOG_EVERY_S", 1.0)  # long enough for a loaded machine to refuse 3
    threads = limits.HandlerThreads(2)  # one waiting call may run; the other thread is kept

    def refuse(times: int) -> None:
        for _ in range(times):
            with pytest.raises(ServerBusyError, match="the server is busy: 1 call that waits for the model or a write"):
                with threads.waiting_call(refused="nothing was done"):
                    pass

    def counts() -> list[str]:
        return [r.getMessage().split(": ")[1].split(" ")[0] for r in caplog.records if "refused as busy" in r.getMessage()]

    with caplog.at_level("WARNING", logger="pictor.server.limits"), threads.waiting_call(refused="-"):
        refuse(3)
        assert counts() == ["1"]  # the first at once; two wait for the spell to end
        wait_until(lambda: len(counts()) >= 2, timeout=10)
        assert counts() == ["1", "2"]
        refuse(1)
        threads.flush_refusals()  # the server's stop
        assert counts() == ["1", "2", "1"]
        time.sleep(1.5)  # no timer left to log anything
        assert counts() == ["1", "2", "1"]


def test_info_names_the_index_in_use_and_a_rebuild_under_way(tmp_path: Path) -> None:
    import dataclasses

    from pictor.core.spec import ModelSpec
    from pictor.core.store import IndexStore
    from pictor.server.engine import _index_type_text

    with IndexStore.create(tmp_path / "s", ModelSpec("test_backbone", "random", 8)) as store:
        info = store.info()
    assert _index_type_text(info) == "auto (Flat)"
    assert _index_type_text(dataclasses.replace(info, rebuilding="HNSW32")) == "auto (Flat); rebuilding as HNSW32"
    assert _index_type_text(dataclasses.replace(info, index_type="Flat")) == "Flat"
