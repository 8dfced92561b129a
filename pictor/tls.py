"""TLS credentials for gRPC from PEM files: the server's (``pictor serve --tls-cert``) and a
client's (``ClientTLS``).

The files are checked with Python's ssl module as they are read, so a wrong one is named when
the server starts or the client is made, not left to fail every handshake later; the client
turns a handshake that failed into what to change (``handshake_hint``).
"""

from __future__ import annotations

import ssl

import grpc

from pictor.config import ClientTLS
from pictor.errors import InvalidRequestError

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_CONVERT = "(gRPC takes PEM files; a DER one converts with `openssl x509 -inform der -in FILE -out FILE.pem`)"


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """The server's TLS: its certificate chain and key, and with ``client_ca`` mutual TLS
    (clients must present a certificate that CA signed)."""
    chain, private_key = _key_pair(cert, key, "the server's")
    roots = _ca_bundle(client_ca, "client CA") if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    """A client's TLS: whom it trusts (``tls.ca``, else the system's CAs) and what it shows."""
    roots = _ca_bundle(tls.ca, "CA") if tls.ca else None
    chain, private_key = _key_pair(tls.cert, tls.key, "the client's") if tls.cert else (None, None)
    return grpc.ssl_channel_credentials(roots, private_key, chain)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InvalidRequestError(f"cannot read {what} {path}: no such file") from None
    except OSError as e:  # a folder, no permission (a key readable by its owner only, say)
        raise InvalidRequestError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _ca_bundle(path: str, what: str) -> bytes:
    data = _read(path, f"the TLS {what} file")
    try:
        ssl.create_default_context(cadata=data.decode("ascii", "replace"))
    except ssl.SSLError:
        raise InvalidRequestError(f"the TLS {what} file {path} holds no PEM certificate {_CONVERT}") from None
    return data


def _key_pair(cert: str, key: str, whose: str) -> tuple[bytes, bytes]:
    """A certificate chain and its private key, checked to belong together."""
    chain = _read(cert, f"{whose} TLS certificate")
    private_key = _read(key, f"{whose} TLS key")
    if _CERTIFICATE not in chain:
        raise InvalidRequestError(f"{whose} TLS certificate {cert} holds no PEM certificate "
                                  f"{'(it is a private key: are the certificate and key swapped?) ' if b'PRIVATE KEY-----' in chain else ''}"
                                  f"{_CONVERT}")
    if b"ENCRYPTED" in private_key:  # "BEGIN ENCRYPTED PRIVATE KEY", or a traditional key's "Proc-Type: 4,ENCRYPTED"
        raise InvalidRequestError(f"{whose} TLS key {key} is encrypted, and gRPC reads only unencrypted keys: "
                                  f"`openssl pkey -in {key} -out plain.key` (keep it readable by this user only)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password="")  # (not a prompt on the terminal)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise InvalidRequestError(f"{whose} TLS key {key} is not the key of the certificate {cert}") from None
        raise InvalidRequestError(f"{whose} TLS certificate {cert} or key {key} could not be read: {e.reason or e} "
                                  f"(the key must be a PEM private key: BEGIN PRIVATE KEY) {_CONVERT}") from None
    return chain, private_key


def handshake_hint(details: str, tls: ClientTLS | None) -> str:
    """What to change when a call of a client with ``tls`` failed to connect with ``details``
    (gRPC's words), or ""."""
    if "WRONG_VERSION_NUMBER" in details:
        return "the server does not speak TLS: call it without (unset PICTOR_TLS and PICTOR_TLS_*)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return ("the server's certificate is not signed by a CA this client trusts, or it has expired: give its "
                "CA's certificate (PICTOR_TLS_CA; else the system's CAs are trusted)")
    if "Hostname Verification Check failed" in details:
        return ("the server's certificate is not for the name called: call it by a name it is for, or give "
                "that name (PICTOR_TLS_SERVER_NAME)")
    if "Socket closed" not in details:  # (else the server closed the connection as it opened)
        return ""
    if tls is None:
        return ("the server closed the connection at once: it may take only TLS (PICTOR_TLS_CA: its CA's "
                "certificate, or PICTOR_TLS=1 where the system's CAs signed its certificate)")
    if not tls.cert:
        return ("the server closed the connection at once: it may take only clients with a certificate its "
                "CA signed (mutual TLS: PICTOR_TLS_CLIENT_CERT and PICTOR_TLS_CLIENT_KEY)")
    return ("the server closed the connection at once: it may not take this client's certificate (not signed "
            "by the CA it trusts, expired, or not for client use)")
