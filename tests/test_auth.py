"""A server with a token (PICTOR_TOKEN): calls without it are refused, health checks are not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess, pictor
from grpc_reflection.v1alpha import reflection_pb2

from pictor.client import PictorClient, UpsertItem
from pictor.errors import InvalidRequestError, UnauthenticatedError

TOKEN = "s3cret-token_of/this.server"


def test_calls_need_the_token_and_health_checks_do_not(
        built_index: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.cli import main

    monkeypatch.setenv("PICTOR_TOKEN", TOKEN)
    server = ServerProcess(built_index).start()
    monkeypatch.delenv("PICTOR_TOKEN")
    try:
        assert "calls need the token of PICTOR_TOKEN, health checks do not" in server.read_log()
        with PictorClient(server.target) as client:
            assert client.health() == "SERVING"  # a probe needs no secret
            with pytest.raises(UnauthenticatedError, match="carried none: set PICTOR_TOKEN"):
                client.info()
            with pytest.raises(UnauthenticatedError):  # a stream, refused before its items are read
                client.upsert([UpsertItem(key="x", vector=[1.0] * 1280)])
        with PictorClient(server.target, token=TOKEN + "x") as client, \
                pytest.raises(UnauthenticatedError, match="carried another: check PICTOR_TOKEN"):
            client.search(key="x")
        with grpc.insecure_channel(server.target) as channel:  # reflection's stream too
            reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                next(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with PictorClient(server.target, token=TOKEN) as client:
            assert client.info().index_size == 12
            first = client.list_items(limit=1)[0][0].key
            vector = client.get([first], vectors=True)[0][0].vector or []
            assert client.upsert([UpsertItem(key="x", vector=vector)]) == (1, 0)
        # The client commands send $PICTOR_TOKEN.
        assert main(["info", "--target", server.target]) == 2
        assert "carried none: set PICTOR_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("PICTOR_TOKEN", TOKEN)
        assert main(["get", "x", "--target", server.target]) == 0
    finally:
        assert server.stop() == 0


def test_a_token_that_cannot_be_a_header_is_refused_without_saying_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="token must be 1 to 4096 visible ASCII characters without spaces"):
        PictorClient("localhost:1", token="two words")
    monkeypatch.setenv("PICTOR_TOKEN", "pässword")
    r = pictor("serve", "--index", str(tmp_path / "missing"), "--port", "0", check=False)
    assert r.returncode == 2 and "got 8 characters, of which character 2 is a space" in r.stderr and "(from PICTOR_TOKEN)" in r.stderr
    assert "pässword" not in r.stderr
    r = pictor("info", check=False)  # the client commands' too
    assert r.returncode == 2 and "of which character 2 is a space" in r.stderr and "(from PICTOR_TOKEN)" in r.stderr
