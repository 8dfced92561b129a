"""A server with a token (PICTOR_TOKEN): calls without it are refused, health checks are not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess, pictor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from pictor.client import PictorAsyncClient, PictorClient, UpsertItem
from pictor.errors import InvalidRequestError, UnauthenticatedError
from pictor.v1 import pictor_pb2 as pb

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
            with pytest.raises(UnauthenticatedError, match="carried none: send it as PICTOR_TOKEN"):
                client.info()
            with pytest.raises(UnauthenticatedError):  # a stream, refused before its items are read
                client.upsert([UpsertItem(key="x", vector=[1.0] * 1280)])
        with PictorClient(server.target, token=TOKEN + "x") as client, \
                pytest.raises(UnauthenticatedError, match="carried another: send it as"):
            client.search(key="x")
        with grpc.insecure_channel(server.target) as channel:  # reflection's stream too
            reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                next(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = channel.unary_unary("/pictor.v1.Pictor/Info", request_serializer=pb.InfoRequest.SerializeToString,
                                       response_deserializer=pb.InfoResponse.FromString)
            for scheme in ("Bearer", "bearer"):  # HTTP reads the scheme in any case
                assert info(pb.InfoRequest(), timeout=10, metadata=[("authorization", f"{scheme} {TOKEN}")]
                            ).index_size == 12
            with pytest.raises(grpc.RpcError, match="carried 2 authorization headers, where one is taken"):
                info(pb.InfoRequest(), timeout=10,  # (a lax reader would take either the first or the last)
                     metadata=[("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}")])
            # gRPC's client-side health checking watches without a token; Watch is not served.
            with pytest.raises(grpc.RpcError) as watched:
                next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
            assert watched.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with PictorClient(server.target, token=TOKEN) as client:
            assert client.info().index_size == 12
            first = client.list_items(limit=1)[0][0].key
            vector = client.get([first], vectors=True)[0][0].vector or []
            assert client.upsert([UpsertItem(key="x", vector=vector)]) == (1, 0)

        async def with_the_token() -> None:  # the asyncio client too, its Upsert's own connection included
            async with PictorAsyncClient(server.target, token=TOKEN) as client:
                assert (await client.info()).index_size == 13
                assert await client.upsert([UpsertItem(key="x", vector=vector)]) == (0, 1)
            async with PictorAsyncClient(server.target) as client:
                with pytest.raises(UnauthenticatedError, match="carried none: send it as PICTOR_TOKEN"):
                    await client.upsert([UpsertItem(key="x", vector=vector)])

        asyncio.run(with_the_token())
        # The client commands send $PICTOR_TOKEN.
        assert main(["info", "--target", server.target]) == 2
        assert "carried none: send it as PICTOR_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("PICTOR_TOKEN", TOKEN)
        assert main(["get", "x", "--target", server.target]) == 0
        monkeypatch.setenv("PICTOR_TOKEN", "not one")  # health sends none, so does not read it
        assert main(["health", "--target", server.target]) == 0
    finally:
        assert server.stop() == 0
    log = server.read_log()
    assert "/pictor.v1.Pictor/Info from ipv4:127.0.0.1:" in log and "UNAUTHENTICATED: this server takes" in log
    assert TOKEN not in log


def test_a_token_that_cannot_be_a_header_is_refused_without_saying_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="token must be 1 to 4096 visible ASCII characters without spaces"):
        PictorClient("localhost:1", token="two words")
    with pytest.raises(InvalidRequestError, match=r"character 7 is a space.*\(give the token alone, without 'Bearer '\)"):
        PictorClient("localhost:1", token="Bearer x")
    with pytest.raises(InvalidRequestError, match="token must be text, got a int"):
        PictorClient("localhost:1", token=12345)  # type: ignore[arg-type]  # the mistake under test
    config = tmp_path / "pictor.toml"
    config.write_text("token = 987654321\n")  # unquoted: a number
    r = pictor("serve", "--index", str(tmp_path / "missing"), "--config", str(config), check=False)
    assert r.returncode == 2 and "setting token in the config file is not a valid str; write it in quotes" in r.stderr
    assert "987654321" not in r.stderr
    monkeypatch.setenv("PICTOR_TOKEN", "pässword")
    r = pictor("serve", "--index", str(tmp_path / "missing"), "--port", "0", check=False)
    assert r.returncode == 2 and "got 8 characters, of which character 2 is a space" in r.stderr and "(from PICTOR_TOKEN)" in r.stderr
    assert "pässword" not in r.stderr
    r = pictor("info", check=False)  # the client commands' too
    assert r.returncode == 2 and "of which character 2 is a space" in r.stderr and "(from PICTOR_TOKEN)" in r.stderr
