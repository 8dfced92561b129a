"""TLS credentials for gRPC from PEM files: the server's (``pictor serve --tls-cert``) and a
client's (``ClientTLS``).

The files are checked with Python's ssl module as they are read, so a wrong one is named when
the server starts or the client is made, not left to fail every handshake later; the client
turns a handshake that failed into what to change (``handshake_hint``).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading

import grpc

from pictor.config import ClientTLS
from pictor.errors import InvalidRequestError

log = logging.getLogger(__name__)

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")
_CONVERT = "(gRPC takes PEM files; a DER one converts with `openssl x509 -inform der -in FILE -out FILE.pem`)"
_CONVERT_KEY = "(gRPC takes PEM files; a DER key converts with `openssl pkey -inform der -in FILE -out FILE.pem`)"


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """The server's TLS: its certificate chain and key, and with ``client_ca`` mutual TLS
    (clients must present a certificate that CA signed); the files are read again when they
    change (``CertificateFiles``)."""
    files = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(files.configuration, files.changed,
                                               require_client_authentication=bool(client_ca))


class CertificateFiles:
    """The server's TLS files, read again when one changes, so that a renewed certificate is
    served from the next connection on without a restart: gRPC asks ``changed`` before each
    handshake. A change that cannot be served (a key not yet written beside its new
    certificate, say) is logged once and the files in use are kept."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.paths = (cert, key, client_ca)
        self._lock = threading.Lock()
        self._seen = self._stamp()  # (before reading: a change meanwhile is read at the next connection)
        self.configuration = self._read()

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """What tells a file changed: its inode (a file replaced, a symlink moved), size, mtime."""
        stamps: list[tuple[int, int, int] | None] = []
        for path in filter(None, self.paths):
            try:
                st = os.stat(path)
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:  # gone for a moment as it is replaced
                stamps.append(None)
        return tuple(stamps)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.paths
        chain, private_key = _key_pair(cert, key, "the server's")
        roots = _ca_bundle(client_ca, "client CA") if client_ca else None
        return grpc.ssl_server_certificate_configuration([(private_key, chain)], root_certificates=roots)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """The files read again when they changed since last read, else None (keep those in use)."""
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            self._seen = stamp  # (a change that cannot be served is said once, not at each connection)
            try:
                self.configuration = self._read()
            except InvalidRequestError as e:
                log.warning("the TLS files changed, but cannot be served; keeping those read before: %s", e)
                return None
            log.info("TLS files read again (%s): new connections get them, unless gRPC cannot use their key type "
                     "(its own error lines then say so, and the files before stay in use)",
                     ", ".join(filter(None, self.paths)))
            return self.configuration


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
    """The PEM certificates of a CA file, checked; gRPC gets them alone, as ssl checked them
    (ssl takes only ASCII, where a bundle may have comments in UTF-8)."""
    data = _read(path, f"the TLS {what} file")
    certificates = "\n".join(m.decode() for m in _PEM_CERTIFICATE.findall(data))
    if not certificates or not _parse(certificates):
        raise InvalidRequestError(f"the TLS {what} file {path} holds no PEM certificate {_CONVERT}")
    return certificates.encode()


def _parse(certificates: str) -> bool:
    try:
        ssl.create_default_context(cadata=certificates)
        return True
    except ssl.SSLError:
        return False


def _key_pair(cert: str, key: str, whose: str) -> tuple[bytes, bytes]:
    """A certificate chain and its private key, checked to belong together."""
    chain = _read(cert, f"{whose} TLS certificate")
    private_key = _read(key, f"{whose} TLS key")
    if not _PEM_CERTIFICATE.search(chain):
        swapped = "(it is a private key: are the certificate and key swapped?) " if b"PRIVATE KEY-----" in chain else ""
        raise InvalidRequestError(f"{whose} TLS certificate {cert} holds no PEM certificate {swapped}{_CONVERT}")
    if b"PRIVATE KEY-----" not in private_key:
        raise InvalidRequestError(f"{whose} TLS key {key} holds no PEM private key {_CONVERT_KEY}")
    if b"ENCRYPTED" in private_key:  # "BEGIN ENCRYPTED PRIVATE KEY", or a traditional key's "Proc-Type: 4,ENCRYPTED"
        raise InvalidRequestError(f"{whose} TLS key {key} is encrypted, and gRPC reads only unencrypted keys: "
                                  f"`openssl pkey -in {key} -out plain.key` (keep it readable by this user only)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password="")  # (not a prompt on the terminal)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise InvalidRequestError(f"{whose} TLS key {key} is not the key of the certificate {cert} (of the first "
                                      "in it: its own certificate comes first, then those of the CAs between it "
                                      "and the root)") from None
        raise InvalidRequestError(f"{whose} TLS certificate {cert} or key {key} could not be read: "
                                  f"{e.reason or e}") from None
    return chain, private_key


def handshake_hint(details: str, tls: ClientTLS | None) -> str:
    """What to change when a call of a client with ``tls`` failed to connect with ``details``
    (gRPC's words), or ""."""
    if "WRONG_VERSION_NUMBER" in details:
        return "the server does not speak TLS: call it without (unset PICTOR_TLS and PICTOR_TLS_*)"
    if "certificate has expired" in details or "certificate is not yet valid" in details:
        return "the server's certificate is out of its dates (expired, or the clocks disagree): renew it there"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return ("the server's certificate is not signed by a CA this client trusts: give its CA's certificate "
                "(PICTOR_TLS_CA; else the system's CAs are trusted), or have the server send the CA certificates "
                "between its own and the root after its own (--tls-cert)")
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
