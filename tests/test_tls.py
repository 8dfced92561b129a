"""TLS and mutual TLS: the server's --tls-* files, the client's ClientTLS and PICTOR_TLS_*, and
what each side says when the two do not agree. Certificates: tests/data/tls
(scripts/make_test_certs.sh)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ServerProcess, pictor, wait_until

from pictor.client import ClientTLS, PictorAsyncClient, PictorClient, UpsertItem
from pictor.config import ServerSettings, build_settings, default_tls
from pictor.errors import InvalidRequestError, ServerUnavailableError
from pictor.tls import channel_credentials, handshake_hint, server_credentials

CERTS = Path(__file__).parent / "data" / "tls"
CA, OTHER_CA = str(CERTS / "ca.pem"), str(CERTS / "other-ca.pem")
SERVER = {"cert": str(CERTS / "server.pem"), "key": str(CERTS / "server.key")}
CLIENT = ClientTLS(ca=CA, cert=str(CERTS / "client.pem"), key=str(CERTS / "client.key"))
STRANGER = ClientTLS(ca=CA, cert=str(CERTS / "other-client.pem"), key=str(CERTS / "other-client.key"))
TLS_FLAGS = ("--tls-cert", SERVER["cert"], "--tls-key", SERVER["key"])


def test_a_server_over_tls_takes_clients_that_trust_its_ca(built_index: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pictor.cli import main

    server = ServerProcess(built_index, *TLS_FLAGS).start()
    try:
        assert "; TLS)" in server.read_log()
        with PictorClient(server.target, tls=ClientTLS(ca=CA)) as client:
            assert client.health() == "SERVING" and client.info().index_size == 12
        # The certificate is for localhost and 127.0.0.1; another name is checked too.
        with PictorClient(f"localhost:{server.port}", tls=ClientTLS(ca=CA, server_name="localhost")) as client:
            assert client.info().index_size == 12
        refused: dict[str, ClientTLS | bool] = {
            "not signed by a CA this client trusts": ClientTLS(ca=OTHER_CA),
            "not for the name called": ClientTLS(ca=CA, server_name="pictor.example.com"),
            "it may take only TLS": False,
        }
        for said, tls in refused.items():
            with PictorClient(server.target, tls=tls, timeout=10) as client, \
                    pytest.raises(ServerUnavailableError, match=f"cannot connect to the server at .*{said}"):
                client.info()
        # The client commands: PICTOR_TLS_CA; `health` calls over TLS too.
        monkeypatch.setenv("PICTOR_TLS_CA", CA)
        assert main(["health", "--target", server.target]) == 0
        assert main(["info", "--target", server.target, "--json"]) == 0
        assert '"index_size": 12' in capsys.readouterr().out
        monkeypatch.setenv("PICTOR_TLS_CA", OTHER_CA)
        assert main(["health", "--target", server.target, "--timeout", "10"]) == 4
        err = capsys.readouterr().err
        assert "not signed by a CA this client trusts" in err and "is `pictor serve` running there?" not in err
    finally:
        assert server.stop() == 0
    plain = ServerProcess(built_index).start()
    try:
        with PictorClient(plain.target, tls=ClientTLS(ca=CA), timeout=10) as client, \
                pytest.raises(ServerUnavailableError, match="the server does not speak TLS: call it without"):
            client.info()
    finally:
        assert plain.stop() == 0


def test_with_a_client_ca_only_clients_with_a_certificate_it_signed_connect(built_index: Path) -> None:
    server = ServerProcess(built_index, *TLS_FLAGS, "--tls-client-ca", CA).start()
    try:
        assert f"clients need a certificate signed by the CA of {CA}" in server.read_log()
        with PictorClient(server.target, tls=CLIENT) as client:
            assert client.health() == "SERVING" and client.info().index_size == 12
        refused: dict[str, ClientTLS | bool] = {
            "may take only clients with a certificate its CA signed": ClientTLS(ca=CA),
            "may not take this client's certificate": STRANGER,
            "may take only TLS": False,
        }
        for said, tls in refused.items():
            with PictorClient(server.target, tls=tls, timeout=10) as client, \
                    pytest.raises(ServerUnavailableError, match=said):
                client.health()  # health checks too: the handshake comes before any call

        async def over_mutual_tls() -> None:  # the asyncio client, its Upsert's own connection included
            async with PictorAsyncClient(server.target, tls=CLIENT) as client:
                assert await client.health() == "SERVING" and (await client.info()).index_size == 12
                assert await client.upsert([UpsertItem(key="tls/0", vector=[1.0] * 1280)]) == (1, 0)
                assert await client.delete(["tls/0"]) == (1, [])
            async with PictorAsyncClient(server.target, tls=STRANGER, timeout=10) as client:
                with pytest.raises(ServerUnavailableError, match="may not take this client's certificate"):
                    await client.health()

        asyncio.run(over_mutual_tls())
        # Through the client commands' variables, in a process of its own.
        env = {"PICTOR_TLS_CA": CA, "PICTOR_TLS_CLIENT_CERT": CLIENT.cert, "PICTOR_TLS_CLIENT_KEY": CLIENT.key}
        r = pictor_env(env, "info", "--target", server.target)
        assert r.returncode == 0 and "12" in r.stdout
        r = pictor_env({"PICTOR_TLS_CA": OTHER_CA}, "health", "--target", server.target, "--timeout", "10")
        assert r.returncode == 4 and "not signed by a CA this client trusts" in r.stderr
        assert "ssl_transport_security" not in r.stderr  # gRPC's own line before ours (GRPC_VERBOSITY=INFO shows it)
    finally:
        assert server.stop() == 0


def test_a_renewed_certificate_is_served_without_a_restart(built_index: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(SERVER["cert"], cert)
    shutil.copy(SERVER["key"], key)
    server = ServerProcess(built_index, "--tls-cert", str(cert), "--tls-key", str(key)).start()
    try:
        with PictorClient(server.target, tls=ClientTLS(ca=CA)) as client:
            assert client.health() == "SERVING"
            # Renewed (by another CA, to tell them apart): the next connection gets the new one.
            shutil.copy(CERTS / "other-server.pem", cert)
            shutil.copy(CERTS / "other-server.key", key)
            with PictorClient(server.target, tls=ClientTLS(ca=OTHER_CA)) as renewed:
                assert renewed.info().index_size == 12
            assert client.health() == "SERVING"  # a connection open before keeps its session
        with PictorClient(server.target, tls=ClientTLS(ca=CA), timeout=10) as client, \
                pytest.raises(ServerUnavailableError, match="not signed by a CA this client trusts"):
            client.health()
        # Half renewed (the certificate written, not yet its key): the files in use are kept.
        shutil.copy(SERVER["cert"], cert)
        with PictorClient(server.target, tls=ClientTLS(ca=OTHER_CA)) as client:
            assert client.health() == "SERVING"
        wait_until(lambda: "keeping those read before" in server.read_log())
        assert "is not the key of the certificate" in server.read_log()
        shutil.copy(SERVER["key"], key)
        with PictorClient(server.target, tls=ClientTLS(ca=CA)) as client:
            assert client.health() == "SERVING"
    finally:
        assert server.stop() == 0
    assert server.read_log().count("TLS files read again") == 2


def pictor_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    with pytest.MonkeyPatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        return pictor(*args, check=False)


def test_files_that_cannot_serve_tls_are_named_before_anything_loads(tmp_path: Path) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "empty.pem").touch()
    (tmp_path / "broken.key").write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    (tmp_path / "ca.der").write_bytes(b"\x30\x82\x01\x8e\xa0\x03\x02\x01\x02\xff\xfe")  # binary: not ASCII
    # A bundle of two CAs with comments in UTF-8 (ssl's cadata takes only ASCII) is read for its certificates.
    (tmp_path / "bundle.pem").write_bytes("# CA of Société Générale\n".encode() + Path(CA).read_bytes()
                                          + Path(OTHER_CA).read_bytes())
    server_credentials(SERVER["cert"], SERVER["key"], str(tmp_path / "bundle.pem"))
    channel_credentials(ClientTLS(ca=str(tmp_path / "bundle.pem")))
    cases = {
        "no such file": (str(tmp_path / "missing.pem"), SERVER["key"], ""),
        "is not the key of the certificate": (SERVER["cert"], CLIENT.key, ""),
        "it is a private key: are the certificate and key swapped?": (SERVER["key"], SERVER["cert"], ""),
        "holds no PEM certificate": (str(tmp_path / "garbage.pem"), SERVER["key"], ""),
        "could not be read": (SERVER["cert"], str(tmp_path / "broken.key"), ""),
        "the TLS client CA file .* holds no PEM certificate": (*SERVER.values(), SERVER["key"]),
        "Is a directory": (str(tmp_path), SERVER["key"], ""),
        "is encrypted, and gRPC reads only unencrypted keys": (SERVER["cert"], str(CERTS / "server-encrypted.key"), ""),
        "holds no PEM private key .*openssl pkey -inform der": (SERVER["cert"], str(tmp_path / "empty.pem"), ""),
        "the TLS client CA file .*empty.pem holds no PEM certificate": (*SERVER.values(), str(tmp_path / "empty.pem")),
        "the TLS client CA file .*ca.der holds no PEM certificate": (*SERVER.values(), str(tmp_path / "ca.der")),
    }
    for said, (cert, key, client_ca) in cases.items():
        with pytest.raises(InvalidRequestError, match=said):
            server_credentials(cert, key, client_ca)
    with pytest.raises(InvalidRequestError, match="the client's TLS key .* is not the key of the certificate"):
        channel_credentials(ClientTLS(ca=CA, cert=CLIENT.cert, key=STRANGER.key))
    # The command names the file and exits 2 without loading the index (there is none).
    r = pictor("serve", "--index", str(tmp_path / "no-index"), "--port", "0", "--tls-cert", SERVER["cert"],
               "--tls-key", CLIENT.key, check=False)
    assert r.returncode == 2 and "is not the key of the certificate" in r.stderr


def test_tls_settings_come_in_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match=r"tls_cert must be given with tls_key .* \(from --tls-cert\)"):
        build_settings(ServerSettings, {"tls_cert": "a.pem"}, env={})
    with pytest.raises(InvalidRequestError, match=r"tls_client_ca must be given with tls_cert .*PICTOR_TLS_CLIENT_CA"):
        build_settings(ServerSettings, {}, env={"PICTOR_TLS_CLIENT_CA": "ca.pem"})
    with pytest.raises(InvalidRequestError, match="give both or neither"):
        ClientTLS(cert="c.pem")
    with pytest.raises(InvalidRequestError, match="tls must be a ClientTLS, True, False or None, got str"):
        PictorClient("localhost:1", tls="ca.pem")  # type: ignore[arg-type]  # the mistake under test
    assert PictorClient("localhost:1", tls=None).tls is None and PictorClient("localhost:1", tls=True).tls == ClientTLS()
    for name in ("PICTOR_TLS", "PICTOR_TLS_CA", "PICTOR_TLS_CLIENT_CERT", "PICTOR_TLS_CLIENT_KEY",
                 "PICTOR_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert default_tls() is None
    monkeypatch.setenv("PICTOR_TLS", "1")
    assert default_tls() == ClientTLS()  # the system's CAs
    monkeypatch.setenv("PICTOR_TLS", "0")
    assert default_tls() is None
    monkeypatch.setenv("PICTOR_TLS_CA", CA)
    with pytest.raises(InvalidRequestError, match="PICTOR_TLS=0 turns TLS off, but PICTOR_TLS_CA set TLS up"):
        default_tls()
    monkeypatch.delenv("PICTOR_TLS")
    monkeypatch.setenv("PICTOR_TLS_CLIENT_KEY", CLIENT.key)
    with pytest.raises(InvalidRequestError, match=r"give both or neither \(got key only\) \(from PICTOR_TLS_CLIENT_CERT"):
        default_tls()
    monkeypatch.setenv("PICTOR_TLS_CLIENT_CERT", CLIENT.cert)
    assert default_tls() == CLIENT
    r = pictor_env({"PICTOR_TLS": "maybe"}, "info")  # every command checks the environment
    assert r.returncode == 2 and "PICTOR_TLS='maybe'" in r.stderr


def test_a_handshake_gone_wrong_is_said_as_what_to_change() -> None:
    """gRPC's words for each failure (as seen from grpcio 1.85), and the hint given for them."""
    expired = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5: Tls handshake failed "
               "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
               "CERTIFICATE_VERIFY_FAILED: certificate has expired: OK")
    assert "out of its dates (expired, or the clocks disagree): renew it there" in handshake_hint(expired, CLIENT)
    unknown_ca = expired.replace("certificate has expired", "unable to get local issuer certificate")
    assert "not signed by a CA this client trusts" in handshake_hint(unknown_ca, CLIENT)
    assert handshake_hint("failed to connect to all addresses; ... Connection refused", CLIENT) == ""
