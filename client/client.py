"""Light client for a Pictor server: grpcio and protobuf only, typed results, domain errors.

Example::

    from pictor.client import PictorClient

    with PictorClient("localhost:50051") as client:
        for label in client.classify(open("daisy.jpg", "rb").read()).labels:
            print(label.name, label.score)
        for hit in client.search(image=open("daisy.jpg", "rb").read(), k=5):
            print(hit.key, hit.score)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import numbers
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pictor.api import (
    CLASSIFIERS,
    DEFAULT_K,
    DEFAULT_TOP_K,
    MAX_K,
    MAX_LIST,
    MAX_WIDTH,
    UPSERT_CHUNK,
    OpenSetCheck,
    ServerInfo,
    StoredItem,
    refuse_single,
    reply_too_large,
    request_too_large,
)
from pictor.config import (
    DEFAULT_MAX_MESSAGE_MB,
    DEFAULT_PORT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    ClientTLS,
    check_max_message_mb,
    check_token,
)
from pictor.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    ServerUnavailableError,
    shown,
)
from pictor.image_files import path_text
from pictor.status import NO_RESEND, error_from_status
from pictor.tls import channel_credentials, handshake_hint
from pictor.v1 import pictor_pb2 as pb
from pictor.v1 import pictor_pb2_grpc as pb_grpc

ImageData = bytes | bytearray | memoryview  # an image file's bytes
# Timeouts from here up mean no deadline: gRPC fails a call at once when its deadline (from
# about 1e10 s) overflows.
NO_DEADLINE_S = 1e9
MAX_RECONNECT_BACKOFF_MS = 2_000
MAX_ATTEMPTS = 5  # gRPC's own cap on a retry policy's attempts


def _retry_policy(attempts: int, timeout: float | None) -> str:
    """gRPC service config (gRFC A6) that sends a call refused as busy again, up to ``attempts``
    times in all, after waits of about 0.5, 1, 2, 4 s (gRPC's core jitters each by +-20%, where
    the gRFC says random(0, backoff)): less with a ``timeout`` under 20 s, so that the waits
    take at most half of it and a call refused every time says so (ServerBusyError) rather than
    running out of time.

    The server marks every other error "do not resend" (a negative grpc-retry-pushback-ms), so
    only busy refusals come back; the call's timeout spans all its attempts. gRPC allows at most
    5 attempts, so the waits must span the time a busy server needs to catch up: 32 threads of
    one client sending 320 Classify calls to a default server on 2 cores saw 62 of them fail
    with waits of up to 0.1-0.8 s, none with these (bench/health.py's burst). No retry
    throttle: a refusal costs the server little and the waits are what lower the load. With
    gRPC's throttle on, 64 clients classifying in a loop got 27,401 refusals and 595 answers in
    20 s; without it 630 and 919 (bench/health.py).
    """
    first = _first_wait(timeout)
    policy = {"maxAttempts": attempts, "initialBackoff": f"{first:.3f}s", "maxBackoff": f"{8 * first:.3f}s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]}
    service = pb.DESCRIPTOR.services_by_name["Pictor"].full_name
    # Upsert is left out (its own method entry, without a policy, wins): ``PictorClient.upsert``
    # resends it itself, see ``_UpsertStream``.
    return json.dumps({"methodConfig": [{"name": [{"service": service}], "retryPolicy": policy},
                                        {"name": [{"service": service, "method": "Upsert"}]}]})


def _first_wait(timeout: float | None) -> float:
    """The wait before a busy call's first resend: 0.5 s, less for a ``timeout`` under 20 s."""
    # The four waits add up to 15x the first, 18x with the jitter: under half of 40x.
    return 0.5 if timeout is None else max(0.001, min(0.5, timeout / 40))


def _resend_wait(timeout: float | None, resend: int) -> float:
    """The wait before resend ``resend`` (1 for the first) of a call refused as busy, as gRPC's
    retry policy waits (``_retry_policy``)."""
    return _first_wait(timeout) * 2 ** (resend - 1) * random.uniform(0.8, 1.2)


R = TypeVar("R")


@dataclass(frozen=True)
class Label:
    """A class and its score: a probability (a head, ImageNet) or a vote share (kNN)."""

    name: str
    score: float


@dataclass(frozen=True)
class Hit:
    """An indexed item found by Search (or a kNN neighbour): ``score`` is its cosine
    similarity to the query, higher is closer (estimated from a compressed index's codes: see
    ``pictor.v1.Hit`` in the proto)."""

    key: str
    score: float
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Classification:
    """What Classify answered: ``labels`` best first, from ``source`` ("head", "imagenet" or
    "knn"); with ``classifier="all"`` also the kNN vote, the neighbours and whether they agree.
    ``unknown``: an open-set model found that the image fits none of its classes (``open_set``
    says why)."""

    labels: list[Label]
    source: str
    knn_labels: list[Label] = field(default_factory=list)
    neighbors: list[Hit] = field(default_factory=list)
    agree: bool | None = None  # whether the head's top-1 is the kNN's; None: nothing compared
    unknown: bool = False
    open_set: OpenSetCheck | None = None  # with an open-set model: the evidence behind ``unknown``


@dataclass(frozen=True)
class UpsertItem:
    """An item to write under ``key`` (replacing one there): an image file's bytes, which the
    server embeds, or a vector in the index's space (as Embed returns it)."""

    key: str
    image: ImageData | None = b""  # None or b"": none (give a vector)
    vector: Iterable[float] | None = None  # a list or a numpy array
    label: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


def _open_set_check(c: pb.OpenSetCheck) -> OpenSetCheck:
    nearest = None if math.isnan(c.nearest_similarity) else c.nearest_similarity
    return OpenSetCheck(class_fit=c.class_fit, nearest_similarity=nearest, reason=c.reason)


def _plain(value: Any) -> Any:
    """A protobuf field's value as plain Python: a repeated field as a list, a map as a dict."""
    if isinstance(value, str | int | float):
        return value
    return dict(value) if hasattr(value, "keys") else list(value)


def _hit(h: pb.Hit) -> Hit:
    return Hit(key=h.key, score=h.score, label=h.label, attributes=dict(h.attributes))


def _labels(labels: Iterable[pb.Label]) -> list[Label]:
    return [Label(name=x.name, score=x.score) for x in labels]


_UINT32_MAX = 2**32 - 1


def _check_counts(low: int, high: int = _UINT32_MAX, **counts: int) -> None:
    """Refuse counts the proto's uint32 fields cannot carry as the mistake they are: 0 reads as
    "server default", and a negative or too large number does not fit. ``high``: the limit
    when the API has one (else the server names its own)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's ints are Integral
            raise InvalidRequestError(f"{name} must be a whole number, got {shown(value)} ({type(value).__name__})")
        if not low <= value <= high:
            raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}")


_GRPC_SCHEMES = ("dns", "unix", "unix-abstract", "vsock", "ipv4", "ipv6", "xds", "google-c2p")  # scheme:...


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)  # a zone ("fe80::1%eth0") too
    except ValueError:
        return False
    return True


def _with_port(target: str) -> str:
    """``target`` with Pictor's default port when a plain host has none (gRPC would use 443);
    a port that cannot exist is refused (gRPC would try another one)."""
    if not isinstance(target, str):
        raise InvalidRequestError(f"target must be text, host:port, got {type(target).__name__}")
    if not target.strip():
        raise InvalidRequestError("target is empty; give host:port, e.g. localhost:50051")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", target)
    if scheme and scheme[1].lower() in _GRPC_SCHEMES:
        return target  # gRPC's own syntax: "unix:/path", "dns:///host", "xds:///name"
    if scheme and target[scheme.end():].startswith("//"):
        raise InvalidRequestError(f"target {shown(target)}: give host:port without {scheme[1]}://")
    if target.count(":") > 1 and "[" not in target:  # a bare IPv6 address: gRPC would use port 443
        try:
            return f"[{ipaddress.IPv6Address(target)}]:{DEFAULT_PORT}"
        except ValueError:
            raise InvalidRequestError(f"target {shown(target)}: put an IPv6 address in brackets, e.g. "
                                      f"[::1]:{DEFAULT_PORT}") from None
    match = re.fullmatch(r"(\[[^\]]*\]|[A-Za-z0-9._-]+)(?::(.*))?", target)
    if match is None or (match[1].startswith("[") and not _is_ipv6(match[1][1:-1])):
        raise InvalidRequestError(f"target {shown(target)}: give host:port, e.g. localhost:50051 (a host name, "
                                  "an IPv4 address, or an IPv6 one in brackets)")
    if match[2] is None and target.isdigit():  # a port given alone: taken as a host, it failed at the lookup
        raise InvalidRequestError(f"target {shown(target)}: a number alone is no host; give host:port, e.g. "
                                  f"localhost:{target}")
    if match[2] is None:
        return f"{target}:{DEFAULT_PORT}"
    if not re.fullmatch(r"[0-9]{1,5}", match[2]) or not 0 < int(match[2]) <= 65535:
        raise InvalidRequestError(f"target {shown(target)}: port must be a number between 1 and 65535")
    return target


def _image_bytes(image: object, max_bytes: int) -> bytes:
    """An image as protobuf takes it (bytes only), or a clear error for what is not one or
    what no request could carry: gRPC would refuse it only after protobuf had copied it, and
    protobuf fails without saying why on one over 2 GB."""
    if not isinstance(image, bytes | bytearray | memoryview):
        raise InvalidRequestError(f"an image must be the file's bytes, got {type(image).__name__} "
                                  "(read it with open(path, 'rb').read())")
    size = image.nbytes if isinstance(image, memoryview) else len(image)
    if size > max_bytes:
        raise ResourceExhaustedError(request_too_large(size, max_bytes, "this client's"))
    return image if isinstance(image, bytes) else bytes(image)


class _UpsertStream:
    """The requests of one ``upsert``, taken from the caller's items once and kept (up to the
    message limit, as gRPC keeps a call to resend it), so that a stream refused as busy is sent
    again whole by a new call.

    gRPC's own resend of a client stream lost messages from its middle, answered as written: a
    stand-in server refusing half the streams 0-50 ms after they opened got 61 to 63 of 64 items
    in 1 to 5 of 180 streams (grpcio 1.85). Each attempt reads through this one object: a request
    that a refused attempt's sending thread took as the refusal came is kept and sent by the next
    attempt, and a refused attempt's thread asks for nothing more once the next has begun.
    """

    def __init__(self, requests: Iterator[pb.UpsertRequest], max_bytes: int) -> None:
        self._source = requests
        self._kept: list[pb.UpsertRequest] = []
        self._room = max_bytes
        # Held while the caller's items make the next request, which may take its time (a
        # generator reading files): never by ``attempt``.
        self._taking = threading.Lock()
        self._attempts = 0
        self.taken = 0  # items taken from the caller
        self.ended = False  # all of them, and the stream's last message went
        self.failed: BaseException | None = None  # what the caller's items raised
        self.resendable = True

    def attempt(self) -> Iterator[pb.UpsertRequest]:
        """The requests of a new call: those taken already, then the rest of the caller's items,
        then the final message marked last. From now on, earlier calls' threads ask no more."""
        self._attempts += 1
        return self._requests(self._attempts)

    def _requests(self, this: int) -> Iterator[pb.UpsertRequest]:
        sent = 0
        while this == self._attempts:  # else a refused call's sending thread, still asking
            with self._taking:
                request = self._kept[sent] if sent < len(self._kept) else self._take()
            if request is None:
                self.ended = True
                yield pb.UpsertRequest(last=True)  # the items after the last full chunk are written now
                return
            sent += 1
            yield request

    def _take(self) -> pb.UpsertRequest | None:
        try:
            request = next(self._source, None)
        except BaseException as e:  # gRPC reports only "Exception iterating requests!": raised by upsert
            # (gRPC cancels the call for an Exception only: a KeyboardInterrupt or SystemExit
            # would end its sending thread and leave the call waiting for its deadline)
            self.failed = e
            raise _ItemsFailed from e
        if request is None:
            return None
        self.taken += 1
        if self.resendable:
            self._room -= request.ByteSize()
            self.resendable = self._room >= 0
            if self.resendable:
                self._kept.append(request)
            else:
                self._kept.clear()
        return request


class _ItemsFailed(Exception):
    """Raised into gRPC in place of an error from the items of an Upsert, which ``upsert``
    raises itself."""


class _QuietItemsFailed(logging.Filter):
    """gRPC logs an error raised by a stream's request iterator with its traceback before it
    cancels the call; an Upsert raises it to its caller with a message, so the traceback (an
    ERROR under any logging set-up) is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ItemsFailed))


_QUIET_ITEMS_FAILED = _QuietItemsFailed()


def _too_large(details: str) -> str:
    """gRPC's words for a message over a size limit ("CLIENT: Sent message larger than max
    (70034840 vs. 67108864)"), as what is too large and what to do about it."""
    sizes = re.search(r"\((\d+) vs\. (\d+)\)", details)
    if sizes is None:
        return details
    size, limit = (int(n) for n in sizes.groups())
    if "CLIENT: Received" in details:  # a reply, from a server whose limit is higher than this client's
        return reply_too_large(size, limit, "this client's",
                               "less (a smaller k, fewer neighbors, keys or images per call, no vectors)")
    # "SERVER:" is gRPC's own refusal: a server checks sizes itself (pictor.server.errors) up to
    # its raised receive limit, and an older one not at all
    return request_too_large(size, limit, "this client's" if "CLIENT:" in details else "the server's")


def _text_error(what: str, e: Exception, values: Iterable[object] = ()) -> InvalidRequestError:
    """protobuf's TypeError or UnicodeEncodeError (a lone surrogate) as the caller's mistake,
    naming the value of ``values`` that is text but not UTF-8 (a file name's bytes, which Python
    keeps as lone surrogates): protobuf's words name only a position."""
    if (bad := next((v for v in values if isinstance(v, str) and path_text(v) != v), None)) is not None:
        return InvalidRequestError(f"{what}: '{path_text(bad)}' is not UTF-8 text (a file name of other "
                                   "bytes cannot be a key or label)")
    return InvalidRequestError(f"{what} must be text (str, encodable as UTF-8): {e}")


def _check_attributes(attributes: object, whose: str = "") -> None:
    """Attributes as protobuf takes them (text to text), or an error that names the one that is
    not: protobuf's own words name neither the attribute nor the mistake."""
    if not isinstance(attributes, Mapping):
        raise InvalidRequestError(f"{whose}attributes must map text to text (a dict), got {type(attributes).__name__}")
    for name, value in attributes.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequestError(f"{whose}attributes map text to text, got {shown(name, 200)}: {shown(value, 200)}; "
                                      "write numbers as text, e.g. str(3)")


def _label_list(labels: Iterable[str] | None) -> list[str]:
    """A filter's labels read once, as a list: a generator would be empty on its second
    reading (the next page of a listing), and a numpy array has no truth value."""
    if labels is None:  # as attributes=None: no filter
        return []
    refuse_single(labels, "labels", "for one label, write labels=['daisy']")
    return list(labels)


def _fill_filter(f: pb.Filter, labels: list[str], attributes: Mapping[str, str] | None) -> None:
    """Fill a Search or List filter; left unset (no filter) when neither is given."""
    if attributes is not None:
        _check_attributes(attributes)
    if labels or attributes:
        try:
            f.labels.extend(labels)
            f.attributes.update(attributes or {})
        except (TypeError, ValueError) as e:
            raise _text_error("labels and attributes", e) from e


def _fill_vector(vector: pb.Vector, values: object) -> None:
    """Fill ``vector`` with ``values``, or a clear error (bytes would send their byte values, a
    dict its keys, a set its numbers in no order, True 1.0)."""
    refuse_single(values, "a vector", "give numbers: [0.1, 0.2, ...] or a numpy array")
    if isinstance(values, Mapping | AbstractSet):
        raise InvalidRequestError(f"a vector must be a list of numbers in order, got a {type(values).__name__}")
    if (shape := getattr(values, "shape", None)) is not None and len(shape) != 1:
        raise InvalidRequestError(f"a vector must be one row of numbers, got an array of shape {tuple(shape)}")
    if hasattr(values, "dtype"):  # a numpy array: its dtype tells
        truths = values.dtype.kind == "b"
    else:
        values = listed = list(cast(Iterable[object], values))  # (an iterator is read once, here)
        truths = any(isinstance(v, bool) for v in listed)
    if truths:
        raise InvalidRequestError("a vector must be a list of numbers, got true/false values")
    try:
        vector.values.extend(values)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"a vector must be a list of numbers: {e}") from e


def _item(it: UpsertItem, max_bytes: int, position: int) -> pb.Item:
    if not isinstance(it, UpsertItem):
        raise InvalidRequestError(f"upsert takes UpsertItem objects, got {type(it).__name__} {shown(it)} "
                                  f"(item {position}, counting from 0)")
    if not isinstance(it.key, str):  # else the messages below would read "item 5" as a position
        raise InvalidRequestError(f"an item's key must be text (str), got {type(it.key).__name__} {shown(it.key)} "
                                  f"(item {position}, counting from 0)")
    image = b"" if it.image is None else _image_bytes(it.image, max_bytes)
    _check_attributes(it.attributes, f"item {shown(it.key, 200)}: ")
    try:
        item = pb.Item(key=it.key, image=image, label=it.label, attributes=dict(it.attributes))
    except (TypeError, ValueError) as e:  # protobuf's own words do not say which field
        raise _text_error(f"item {it.key!r}: the key, the label and each attribute name and value", e) from e
    if it.vector is not None:
        _fill_vector(item.vector, it.vector)
    return item


_CANNOT_REACH = "cannot reach a Pictor server at"  # nothing answered: maybe the wrong address


def _error_of(code: grpc.StatusCode, details: str, *, said: bool, method: str, target: str, closed: str,
              timeout: float | None, past_deadline: bool, health_service: str = "",
              tls: ClientTLS | None = None) -> PictorError:
    """The Pictor error a failed call's status means: pure, so that another client (asyncio)
    says the same. ``said``: the server marked it "do not resend" (its own words,
    pictor.status); ``method``: the RPC's name ("Check" for health); ``closed``: the class of this
    client, closed meanwhile ("": open); ``past_deadline``: the call ran into this client's ``timeout``; ``tls``:
    how it called (None: plain TCP)."""
    if code == grpc.StatusCode.UNAVAILABLE and said:  # up, and says why it cannot serve
        unavailable = ServerUnavailableError(f"{details} ({code.name})")
        unavailable.server_said = True
        return unavailable
    if code == grpc.StatusCode.CANCELLED and closed:
        details = f"the call was cancelled before its answer came ({details}): this {closed} was closed"
    elif ((code == grpc.StatusCode.UNAVAILABLE and details == "Cancelling all calls")  # gRPC's words
          or code == grpc.StatusCode.CANCELLED):  # (a stopping server ends open calls either way)
        details = f"the server at {target} stopped or cancelled the call while it was open ({details})"
    elif code == grpc.StatusCode.UNAVAILABLE and details.startswith(("Stream removed", "Socket closed")):
        details = f"the connection to the server at {target} was lost during the call ({details})"
    elif code == grpc.StatusCode.UNAVAILABLE and (hint := handshake_hint(details, tls)):
        # (something answered there: not "cannot reach", which hints at a wrong address)
        details = f"cannot connect to the server at {target}{' over TLS' if tls else ''}: {hint} ({details})"
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"{_CANNOT_REACH} {target}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and past_deadline:
        # (earlier, the server ended the call itself and says why)
        details = f"no answer from {target} within the timeout of {timeout:g} s"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        details = _too_large(details)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not said:
        # The server marks every other refusal NO_RESEND (pictor.status).
        return ServerBusyError(f"{details} ({code.name})")
    elif code == grpc.StatusCode.NOT_FOUND and method == "Check":
        details = f"the server has no health status for service {health_service!r}"
    elif code == grpc.StatusCode.UNIMPLEMENTED and method in ("Check", "Info"):
        return _NoSuchCallError(f"the gRPC server at {target} is not a Pictor server ({details})")
    elif code == grpc.StatusCode.UNIMPLEMENTED:  # a Pictor server older than this client, or another
        return _NoSuchCallError(
            f"the gRPC server at {target} has no {method} call: a Pictor server older than this "
            f"client, or not a Pictor server ({details})")
    return error_from_status(code, details)


class _NoSuchCallError(ServerUnavailableError):
    """A gRPC server answered that it has no such method: the call did nothing there (and the
    address may be wrong, so not ``server_said``)."""


def may_be_wrong_address(e: ServerUnavailableError) -> bool:
    """Whether ``e`` may come from calling the wrong address: nothing answered there, or a
    gRPC server that is not Pictor's (not a connection lost, or a deadline, after it answered)."""
    return isinstance(e, _NoSuchCallError) or str(e).startswith(_CANNOT_REACH)


def _refused_times(message: str, attempts: int) -> str:
    """A busy refusal's message (``_call``'s, which ends with the status code) after
    ``attempts`` sends, in the words the server uses for a call gRPC resent (server.errors)."""
    if attempts == 1:
        return message
    said = message.removesuffix(" (RESOURCE_EXHAUSTED)")
    return f"{said} (refused {attempts} times: the client sent it again after random waits) (RESOURCE_EXHAUSTED)"


def _upsert_outcome(sent: int, ended: bool) -> str:
    """What an Upsert stream whose answer was lost may have written, after ``sent`` items and,
    when ``ended``, its last message: the server writes whole chunks as they arrive and the
    items after the last full chunk only once the last message has come."""
    again = "sending them again is safe, keys replace"
    whole = sent // UPSERT_CHUNK * UPSERT_CHUNK
    if ended or whole == sent:
        some = f"some of the {sent} items sent" if sent > 1 else "the item sent"
        return f"{some} may have been written (in chunks of {UPSERT_CHUNK}): {again}"
    if whole:
        return (f"the first {whole} of the {sent} items sent may have been written (whole chunks of "
                f"{UPSERT_CHUNK}; the rest waited for the stream's last message, which never went): {again}")
    none = f"none of the {sent} items sent was" if sent > 1 else "the item sent was not"
    return (f"{none} written (the server writes fewer than {UPSERT_CHUNK} items only with the stream's "
            "last message, which never went): send them again")


class _ClientBase:
    """What the blocking and the asyncio clients share: their settings, each call's request
    built and checked before anything is sent, and a failed call's error. Only the calls
    themselves differ (``PictorClient`` here, ``PictorAsyncClient`` in ``pictor.client.aio``)."""

    _grpc: Any = grpc  # where the channel comes from: grpc, or grpc.aio for the asyncio client

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = DEFAULT_TIMEOUT,
                 max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, max_attempts: int = MAX_ATTEMPTS,
                 token: str | None = None, tls: ClientTLS | bool | None = None) -> None:
        """``timeout``: seconds each call (an Upsert stream: all of it) may take; None (or
        ``math.inf``) for no deadline.

        ``max_attempts``: how many times in all a call the server refuses as busy is sent (1 to
        5; 1 = never again), waiting about 0.5, 1, 2, 4 s (+-20%) before each resend (less for
        a ``timeout`` under 20 s: the waits take at most half of it); one refused every
        time raises ``ServerBusyError``. Only busy refusals are resent (see ``_retry_policy``),
        and an Upsert stream only while its items so far fit in ``max_message_mb``: up to that
        much of a call is kept to resend it, so each open stream may hold that much memory
        here.

        ``token``: sent with every call (``authorization: Bearer TOKEN``) to a server that takes
        calls only with its token (``PICTOR_TOKEN`` there); None or "" sends none. The client
        commands send ``$PICTOR_TOKEN``; this class does not read it.

        ``tls``: call over TLS, trusting the CA and showing the client certificate a
        ``ClientTLS`` names (its files are read here), or with True the system's CAs and no
        client certificate; False or None calls in plain TCP. The client commands read
        ``$PICTOR_TLS*`` (``pictor.config.default_tls``); this class does not."""
        self._begin()
        target = _with_port(target)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)):
            raise InvalidRequestError(f"timeout must be a number of seconds or None, got {shown(timeout)} "
                                      f"({type(timeout).__name__})")
        if timeout is not None and not timeout > 0:
            raise InvalidRequestError(f"timeout must be more than 0 seconds, got {timeout}")
        if type(max_attempts) is not int or not 1 <= max_attempts <= MAX_ATTEMPTS:  # (a bool is not a count)
            raise InvalidRequestError(f"max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}, got {max_attempts!r}")
        if timeout is not None and timeout >= NO_DEADLINE_S:  # gRPC's deadline would overflow: at once
            timeout = None
        check_max_message_mb(max_message_mb)
        if token is not None and token != "":  # "" as an empty PICTOR_TOKEN: none
            check_token(token)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if not isinstance(tls, ClientTLS | bool | None):
            raise InvalidRequestError(f"tls must be a ClientTLS, True, False or None, got {type(tls).__name__}")
        self.tls = ClientTLS() if tls is True else tls or None
        max_bytes = max_message_mb * 1024 * 1024
        self.target = target
        self._max_bytes = max_bytes
        self._max_attempts = max_attempts
        self.timeout = timeout
        self._closed = False
        self._name = type(self).__name__  # in its errors
        # PictorAsyncClient sends each Upsert through a PictorClient made with these.
        self._settings: dict[str, Any] = {"timeout": timeout, "max_message_mb": max_message_mb,
                                          "max_attempts": max_attempts, "token": token, "tls": self.tls}
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            # gRPC waits up to 2 minutes between reconnection attempts after a long
            # outage: a restarted server would stay unreachable for that long.
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            # gRPC resends only what it kept: by default 256 KB of a call, less than
            # most photos. Kept up to the message limit, any call can be resent.
            *([("grpc.service_config", _retry_policy(max_attempts, timeout)),
               ("grpc.per_rpc_retry_buffer_size", max_bytes)] if max_attempts > 1 else []),
        ]
        if self.tls is None:
            self._channel = self._grpc.insecure_channel(target, options=options)
        else:
            if self.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self.tls.server_name))
            self._channel = self._grpc.secure_channel(target, channel_credentials(self.tls), options=options)
        self._stub = pb_grpc.PictorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _begin(self) -> None:
        """What ``__init__`` does first: the asyncio client refuses to be made outside an event
        loop, where it could not call."""

    def _check_open(self) -> None:
        """Refuse a call on a closed client, also one with nothing to send (answered here, not sent)."""
        if self._closed:
            raise InvalidRequestError(f"this {self._name} is closed; make a new one")

    def _time_left(self, started: float | None) -> tuple[float, float | None]:
        """(when the call began, the seconds it has left) for a call about to be sent; the
        timeout counts from ``started`` (``time.monotonic()``; now when None): an Upsert's own
        resends share one."""
        self._check_open()
        now = time.monotonic()
        started = now if started is None else started
        return started, None if self.timeout is None else max(0.0, self.timeout - (now - started))

    def _error(self, code: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, str]],
               method: Callable[..., Any], request: Any, started: float, unknown_outcome: str) -> PictorError:
        """A failed call's status as Pictor's error; ``unknown_outcome`` (a write's) is added where
        the call may have been applied all the same."""
        name = "Check" if method == self._health.Check else next(
            (n for n, m in vars(self._stub).items() if m is method), "this")
        # (as pairs: grpc.aio's Metadata has an `in` that looks at keys only)
        error = _error_of(code, details, said=NO_RESEND in tuple(trailers), method=name, target=self.target,
                          closed=self._name if self._closed else "", timeout=self.timeout,
                          past_deadline=self._past_deadline(started),
                          health_service=getattr(request, "service", ""), tls=self.tls)
        if unknown_outcome and self._outcome_unknown(error, started):
            return type(error)(f"{error}; {unknown_outcome}")
        return error

    def _rpc_error(self, e: grpc.RpcError, method: Callable[..., Any], request: Any, started: float,
                   unknown_outcome: str) -> PictorError:
        """``_error`` for a call gRPC failed (grpc's or grpc.aio's RpcError)."""
        return self._error(e.code(), e.details() or "", e.trailing_metadata() or (), method, request, started,
                           unknown_outcome)

    def _outcome_unknown(self, e: PictorError, started: float) -> bool:
        """Whether a write call that failed with ``e`` may have been applied all the same.

        A call lost, or past this client's deadline, cannot say; one the server ended itself
        (DEADLINE_EXCEEDED before ours: an idle Upsert stream, a caller gone before its write;
        UNAVAILABLE with its reason) says what it wrote, and one that never connected (gRPC's
        "failed to connect") or reached a server without the method wrote nothing."""
        return (isinstance(e, ServerUnavailableError) and not e.server_said and not isinstance(e, _NoSuchCallError)
                and "failed to connect" not in str(e).lower()
                and (not isinstance(e, DeadlineExceededError) or self._past_deadline(started)))

    def _past_deadline(self, started: float) -> bool:
        """Whether a call that began at ``started`` (``time.monotonic()``) ran into this
        client's timeout."""
        return self.timeout is not None and time.monotonic() - started >= self.timeout

    # -- each call's request, checked before anything is sent -----------------------------

    @staticmethod
    def _health_request(service: str) -> health_pb2.HealthCheckRequest:
        if not isinstance(service, str):
            raise InvalidRequestError(f"service must be text, got {type(service).__name__}")
        return health_pb2.HealthCheckRequest(service=service)

    def _classify_request(self, image: ImageData, top_k: int, classifier: str, neighbors: int) -> pb.ClassifyRequest:
        if classifier not in CLASSIFIERS:
            raise InvalidRequestError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        _check_counts(1, MAX_K, top_k=top_k)
        _check_counts(0, MAX_K, neighbors=neighbors)  # 0: the server's default
        return pb.ClassifyRequest(image=_image_bytes(image, self._max_bytes), top_k=top_k,
                                  classifier=cast(pb.Classifier, CLASSIFIERS.index(classifier)), neighbors=neighbors)

    def _search_request(self, image: ImageData | None, key: str | None, vector: Iterable[float] | None, k: int,
                        labels: Iterable[str] | None, attributes: Mapping[str, str] | None, nprobe: int,
                        ef_search: int) -> pb.SearchRequest:
        given = [q for q in (image, key, vector) if q is not None]
        if len(given) != 1:
            raise InvalidRequestError("search takes exactly one of image, key or vector")
        _check_counts(1, MAX_K, k=k)
        _check_counts(0, MAX_WIDTH, nprobe=nprobe, ef_search=ef_search)  # 0: the index's tuned default
        request = pb.SearchRequest(k=k, params=pb.SearchParams(nprobe=nprobe, ef_search=ef_search))
        if image is not None:
            request.image = _image_bytes(image, self._max_bytes)
        elif vector is not None:
            _fill_vector(request.vector, vector)
        if key is not None:
            try:
                request.key = key
            except (TypeError, ValueError) as e:
                raise _text_error("the key", e, [key]) from e
        _fill_filter(request.filter, _label_list(labels), attributes)
        return request

    def _embed_request(self, images: Iterable[ImageData]) -> pb.EmbedRequest | None:
        """None: no images, nothing to send."""
        refuse_single(images, "images", "for one image, write [data]")
        data = [_image_bytes(i, self._max_bytes) for i in images]
        if not data:
            self._check_open()
            return None
        if (size := sum(map(len, data))) > self._max_bytes:
            raise ResourceExhaustedError(f"{len(data)} images together: "
                                         + request_too_large(size, self._max_bytes, "this client's"))
        return pb.EmbedRequest(images=data)

    def _delete_request(self, keys: Iterable[str]) -> pb.DeleteRequest | None:
        """None: no keys, nothing to send."""
        refuse_single(keys, "keys", "for one key, write [key]")
        keys = list(keys)
        try:
            request = pb.DeleteRequest(keys=keys)
        except (TypeError, ValueError) as e:
            raise _text_error("keys", e, keys) from e
        self._check_open()
        return request if request.keys else None

    def _get_request(self, keys: Iterable[str], vectors: bool) -> pb.GetRequest | None:
        """None: no keys, nothing to send."""
        refuse_single(keys, "keys", "for one key, write [key]")
        if not isinstance(vectors, bool):
            raise InvalidRequestError(f"vectors must be True or False, got {shown(vectors)}")
        keys = list(keys)
        try:
            request = pb.GetRequest(keys=keys, vectors=vectors)
        except (TypeError, ValueError) as e:
            raise _text_error("keys", e, keys) from e
        self._check_open()
        return request if request.keys else None

    @staticmethod
    def _list_request(after: str, limit: int, labels: Iterable[str] | None,
                      attributes: Mapping[str, str] | None) -> pb.ListRequest:
        _check_counts(1, MAX_LIST, limit=limit)
        try:
            request = pb.ListRequest(after=after, limit=limit)
        except (TypeError, ValueError) as e:
            raise _text_error("after", e, [after]) from e
        _fill_filter(request.filter, _label_list(labels), attributes)
        return request

    @staticmethod
    def _pages_filter(labels: Iterable[str] | None, attributes: Mapping[str, str] | None, page: int) -> list[str]:
        """``iter_items``'s labels, read once (every page has the same filter), its arguments
        checked before the first page is asked for."""
        _check_counts(1, MAX_LIST, page=page)
        listed = _label_list(labels)
        _fill_filter(pb.Filter(), listed, attributes)
        return listed


# -- each call's answer, as the clients return it ----------------------------------------------

def _health_status(r: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _classification(r: pb.ClassifyResponse) -> Classification:
    return Classification(
        labels=_labels(r.labels), source=r.source, knn_labels=_labels(r.knn_labels),
        neighbors=[_hit(h) for h in r.neighbors],
        # The proto's bool reads false when there was nothing to compare: say so.
        agree=r.agree if r.source == "head" and r.knn_labels else None, unknown=r.unknown,
        open_set=_open_set_check(r.open_set) if r.HasField("open_set") else None,
    )


def _hits(r: pb.SearchResponse) -> list[Hit]:
    return [_hit(h) for h in r.hits]


def _embeddings(r: pb.EmbedResponse) -> list[list[float]]:
    return [list(v.values) for v in r.embeddings]


# The outcome of a Delete whose answer was lost.
_DELETE_MAY_HAVE_APPLIED = ("the delete may have been applied: sending it again is safe (keys already gone "
                            "come back as missing)")


def _stored_items(r: pb.GetResponse) -> tuple[list[StoredItem], list[str]]:
    items = [StoredItem(key=it.key, label=it.label, attributes=dict(it.attributes),
                        vector=list(it.vector.values) if it.HasField("vector") else None)
             for it in r.items]
    return items, list(r.missing)


def _page(r: pb.ListResponse) -> tuple[list[StoredItem], str]:
    return [StoredItem(key=it.key, label=it.label, attributes=dict(it.attributes)) for it in r.items], r.next


def _server_info(r: pb.InfoResponse) -> ServerInfo:
    # By field name, as the server builds the reply from its ServerInfo.
    return ServerInfo(**{f.name: _plain(getattr(r, f.name)) for f in dataclasses.fields(ServerInfo)})


class PictorClient(_ClientBase):
    """Calls a Pictor server. Failed calls raise ``pictor.errors`` types (see ``pictor.status``).
    ``PictorAsyncClient`` (``pictor.client``) makes the same calls from asyncio code."""

    def __enter__(self) -> PictorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running on other threads end with an error."""
        self._closed = True  # first: their CANCELLED is then known to be this close's
        self._channel.close()

    def _call(self, method: Callable[..., R], request: Any, *, started: float | None = None,
              unknown_outcome: str = "") -> R:
        """``method(request)``, its gRPC errors as Pictor's (``_ClientBase._error``)."""
        started, timeout = self._time_left(started)
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._rpc_error(e, method, request, started, unknown_outcome) from None

    def health(self, service: str = "") -> str:
        """Serving status name from the standard health service, e.g. ``"SERVING"``."""
        return _health_status(self._call(self._health.Check, self._health_request(service)))

    def classify(self, image: ImageData, *, top_k: int = DEFAULT_TOP_K, classifier: str = "default",
                 neighbors: int = 0) -> Classification:
        """Labels for one image (the file's bytes), best first.

        ``classifier``: "default" (the server's head with ``serve --model``, else the backbone's
        ImageNet labels, else the kNN vote), "head" (the same without the vote: ``source`` says
        "head" or "imagenet"), "knn" (vote of the ``neighbors`` nearest
        labelled items; 0 = the server's default) or "all" (head and vote, whether they agree,
        and the neighbours; neighbours come with every answer by the vote: "knn", "all", and
        "default" on a server that votes by default). ``unknown`` is true when the
        model's open-set rule finds the image fits none of its classes; ``open_set`` says why.
        Image bytes the server cannot use raise InvalidRequestError (the client sees only the
        status code, so never its subclass InvalidImageError).
        """
        request = self._classify_request(image, top_k, classifier, neighbors)
        return _classification(self._call(self._stub.Classify, request))

    def search(self, *, image: ImageData | None = None, key: str | None = None,
               vector: Iterable[float] | None = None, k: int = DEFAULT_K,
               labels: Iterable[str] | None = (), attributes: Mapping[str, str] | None = None,
               nprobe: int = 0, ef_search: int = 0) -> list[Hit]:
        """The ``k`` nearest items to exactly one of ``image`` (a file's bytes), ``key`` (a stored
        item; NotFoundError when the index has none) or ``vector`` (in the index's space, as
        ``embed`` returns it), best first; ``Hit.score`` is the cosine similarity (an estimate on
        a compressed index: the proto's ``Hit`` says which).

        ``labels`` and ``attributes`` restrict the hits to items with one of those labels and
        all of those attribute values (exactly ``k`` when that many match); ``nprobe`` and
        ``ef_search`` search an approximate index wider for this call only (0: its tuned
        default). A bad image, vector or argument raises InvalidRequestError.
        """
        request = self._search_request(image, key, vector, k, labels, attributes, nprobe, ef_search)
        return _hits(self._call(self._stub.Search, request))

    def embed(self, images: Iterable[ImageData]) -> list[list[float]]:
        """Each image's embedding in the index's space, as Search and Upsert take it (at most
        256 images per call)."""
        request = self._embed_request(images)
        return [] if request is None else _embeddings(self._call(self._stub.Embed, request))

    def upsert(self, items: Iterable[UpsertItem]) -> tuple[int, int]:
        """Stream items to the server; returns (inserted, replaced) once all are durable.

        The server writes the stream in chunks of 64 items, each all or nothing, so a call that
        fails may have written some chunks; sending the items again is safe (keys replace).

        A list (or other sequence) is checked whole before anything is sent: an item the
        client refuses writes nothing. An error raised while iterating other ``items`` (a
        generator) cancels the call and is raised here as it was; the server keeps the chunks
        it had already written, and not the one under way (the stream's final message, marked
        last, never went). No items: nothing is sent, (0, 0).

        A stream refused as busy is sent again whole (up to ``max_attempts``, with the waits of
        any call) while its items so far fit in the message limit; an answer that counts fewer
        items than were sent raises ``ServerUnavailableError``.
        """
        refuse_single(items, "items", "for one item, write [item]")
        started = time.monotonic()  # the timeout counts the items' making too: "all of it"
        # A sequence is converted whole before the stream opens (a bad item writes nothing), and
        # each item once: a vector given as an iterator can be read only once.
        converted: Iterator[pb.UpsertRequest] = iter(
            [self._upsert_request(it, i) for i, it in enumerate(items)] if isinstance(items, Sequence)
            else (self._upsert_request(it, i) for i, it in enumerate(items)))
        first = next(converted, None)
        if first is None:  # nothing to write (the server refuses an empty stream as a raw client's slip)
            self._check_open()
            return 0, 0
        # (kept to resend it only where it may be resent)
        stream = _UpsertStream(itertools.chain([first], converted), self._max_bytes if self._max_attempts > 1 else 0)
        logging.getLogger("grpc._channel").addFilter(_QUIET_ITEMS_FAILED)  # (once: a filter is added once)

        attempts, requests = 1, stream.attempt()
        while True:
            try:
                r = self._call(self._stub.Upsert, requests, started=started)
                break
            except PictorError as e:
                requests = stream.attempt()  # first: the failed call's sending thread takes no more items
                if stream.failed is not None:
                    raise stream.failed from None
                if not isinstance(e, ServerBusyError):
                    if stream.taken and self._outcome_unknown(e, started):
                        raise type(e)(f"{e}; {_upsert_outcome(stream.taken, stream.ended)}") from None
                    raise
                # Refused before the server read anything: nothing written, and sent again.
                wait = _resend_wait(self.timeout, attempts)
                if not stream.resendable and attempts < self._max_attempts:
                    raise ServerBusyError(f"{_refused_times(str(e), attempts)}; not sent again: its items so far "
                                          f"were over the {self._max_bytes // 2**20} MB this client keeps to "
                                          "resend a stream (its message limit)") from None
                if (attempts == self._max_attempts
                        or (self.timeout is not None and time.monotonic() + wait - started >= self.timeout)):
                    raise ServerBusyError(_refused_times(str(e), attempts)) from None
                time.sleep(wait)
                attempts += 1
        if (written := r.inserted + r.replaced) != stream.taken:  # nothing may vanish unsaid on the way
            raise ServerUnavailableError(
                f"the server wrote {written} of the {stream.taken} items sent: the others were lost on the "
                "way; sending them again is safe, keys replace")
        return r.inserted, r.replaced

    def _upsert_request(self, it: UpsertItem, position: int) -> pb.UpsertRequest:
        """One item's message, refused here when over the message limit: gRPC's own refusal
        cannot say which item of the stream it was."""
        try:
            request = pb.UpsertRequest(item=_item(it, self._max_bytes, position))
            if (size := request.ByteSize()) > self._max_bytes:
                raise ResourceExhaustedError(request_too_large(size, self._max_bytes, "this client's"))
        except ResourceExhaustedError as e:
            raise ResourceExhaustedError(f"item {shown(it.key, 200)} (item {position}, counting from 0): {e}") from None
        return request

    def delete(self, keys: Iterable[str]) -> tuple[int, list[str]]:
        """Remove items; returns (deleted, keys that did not exist)."""
        if (request := self._delete_request(keys)) is None:
            return 0, []
        r = self._call(self._stub.Delete, request, unknown_outcome=_DELETE_MAY_HAVE_APPLIED)
        return r.deleted, list(r.missing)

    def get(self, keys: Iterable[str], *, vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        """Stored items by key, each key once in the order first asked (at most 1000 distinct
        keys), with its stored vector when ``vectors``; returns (items, keys the index does not
        hold)."""
        if (request := self._get_request(keys, vectors)) is None:
            return [], []
        return _stored_items(self._call(self._stub.Get, request))

    def list_items(self, after: str = "", limit: int = MAX_LIST, *, labels: Iterable[str] | None = (),
                   attributes: Mapping[str, str] | None = None) -> tuple[list[StoredItem], str]:
        """One page of the index's items in key order after the key ``after`` (at most
        ``limit``, up to 1000), filtered as Search filters; returns (items, next): pass
        ``next`` as ``after`` for the next page, "" after the last. ``iter_items`` pages for you."""
        return _page(self._call(self._stub.List, self._list_request(after, limit, labels, attributes)))

    def iter_items(self, *, labels: Iterable[str] | None = (), attributes: Mapping[str, str] | None = None,
                   page: int = MAX_LIST, after: str = "") -> Iterator[StoredItem]:
        """Every item of the index (that the filter admits) in key order, ``page`` per call,
        from the first key after ``after`` (to go on from a listing cut off). Writes made
        meanwhile show up if their keys come after the page being read. Bad arguments are
        refused here, not when the iteration starts."""
        return self._pages(self._pages_filter(labels, attributes, page), attributes, page, after)

    def _pages(self, labels: list[str], attributes: Mapping[str, str] | None, page: int, after: str
               ) -> Iterator[StoredItem]:
        while True:
            items, after = self.list_items(after, page, labels=labels, attributes=attributes)
            yield from items
            if not after:
                return

    def info(self) -> ServerInfo:
        """What the server runs: backbone, index size and type, classifier and class names."""
        return _server_info(self._call(self._stub.Info, pb.InfoRequest()))
