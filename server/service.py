"""The gRPC servicer: protobuf messages in, engine calls, protobuf messages out.

No logic lives here beyond translation; errors propagate as domain errors and the error
interceptor (errors.py) turns them into status codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar, cast

import grpc

from pictor.api import CLASSIFIERS, MAX_LIST, UPSERT_CHUNK
from pictor.core.store import Filter, Hits, Item, SearchParams, UpsertResult
from pictor.errors import DeadlineExceededError, InvalidRequestError, PictorError, ServerBusyError
from pictor.iterators import batched
from pictor.server.engine import ClassifyResult, Engine, check_upsert_item
from pictor.v1 import pictor_pb2 as pb
from pictor.v1 import pictor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

log = logging.getLogger(__name__)


def add_hits(field: RepeatedCompositeFieldContainer[pb.Hit], hits: Hits) -> None:
    """Append ``hits`` to a repeated ``Hit`` field, from its rows.

    ``add`` builds each message in place (a list given to the constructor is copied), and
    an empty attribute map is left unset: filling one, even from an empty mapping, costs
    more than the rest of the hit.
    """
    for (key, label, _), score, attributes in zip(hits.rows, hits.scores, hits.attributes, strict=True):
        hit = field.add(key=key, score=score, label=label)
        if attributes:
            hit.attributes.update(attributes)


def labels_to_pb(labels: Iterable[tuple[str, float]]) -> list[pb.Label]:
    return [pb.Label(name=name, score=score) for name, score in labels]


def classify_to_pb(result: ClassifyResult) -> pb.ClassifyResponse:
    check = result.open_set
    response = pb.ClassifyResponse(
        labels=labels_to_pb(result.labels),
        source=result.source,
        knn_labels=labels_to_pb(result.knn_labels),
        agree=result.agree,
        unknown=result.unknown,
        open_set=None if check is None else pb.OpenSetCheck(
            class_fit=check.class_fit, reason=check.reason,
            nearest_similarity=math.nan if check.nearest_similarity is None else check.nearest_similarity),
    )
    add_hits(response.neighbors, result.neighbors)
    return response


def check_active(context: grpc.ServicerContext, before: str) -> None:
    """Skip work for a caller that has gone: its deadline passed (maybe while the call waited
    for a handler thread) or it cancelled. Nothing it would not see is done, nor, for Upsert
    and Delete, written (checked again once the write lock is held: a write may queue there
    behind a rebuild of the index)."""
    if not context.is_active():
        raise DeadlineExceededError(f"the call ended (deadline passed or cancelled) before {before}")


# A client stream that ends this close to its deadline was cut off by it (see _upsert_chunk).
DEADLINE_MARGIN_S = 0.05
REFUSALS_LOG_EVERY_S = 10.0  # a line saying how many calls were refused as busy, at most this often
_LIST_REPLY_MARGIN = 64 * 1024  # of a List reply, for its `next` key (at most 16 KB as UTF-8)
_STREAM_END = object()  # the client closed its side of the stream
T = TypeVar("T")


class HandlerThreads:
    """What may hold the server's handler threads (its --workers), so that one is always free
    for the calls that answer at once: health Check, Info, Get, List, Delete, Search by key or
    vector.

    A client stream (Upsert, reflection) holds its thread for as long as its client sends: at
    most half of them are streams. A call that runs the model (Classify, Embed, Search by image)
    holds its thread while it waits for the forward pass, which runs one at a time: behind 64
    clients classifying, health checks waited over a second in gRPC's queue (bench/health.py).
    Streams and model calls together leave one thread free; one beyond is refused at once
    (RESOURCE_EXHAUSTED), which frees its thread for the next call in the queue.
    """

    def __init__(self, workers: int) -> None:
        self.workers, self.max_streams = workers, workers // 2
        self._lock = threading.Lock()
        self._streams = self._model_calls = 0
        self._refused, self._refusals_logged_at = 0, -math.inf
        self._log_timer: threading.Timer | None = None

    @contextlib.contextmanager
    def stream(self, refused: str) -> Iterator[None]:
        """A thread for a client stream for the block; ``ServerBusyError`` (saying ``refused``)
        when none may be taken."""
        with self._lock:
            if self._streams >= self.max_streams:
                n = self.max_streams
                raise self._refusal(
                    f"{n} stream{'s are' if n != 1 else ' is'} open already (Upsert or reflection; this "
                    f"server's limit: half its --workers); {refused}, send again when one has ended")
            self._check_one_left(refused)
            self._streams += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1

    @contextlib.contextmanager
    def model_call(self, refused: str) -> Iterator[None]:
        """A thread for a call that runs the model, for the block; ``ServerBusyError`` (saying
        ``refused``) when it would take the last free one."""
        with self._lock:
            self._check_one_left(refused)
            self._model_calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._model_calls -= 1

    def _check_one_left(self, refused: str) -> None:
        if self._streams + self._model_calls < self.workers - 1:
            return
        n = self._model_calls
        calls = f"{n} call that runs" if n == 1 else f"{n} calls that run"
        streams = f"{self._streams} open stream{'s' if self._streams != 1 else ''}"
        raise self._refusal(
            f"the server is busy: {calls} the model (Classify, Embed, Search by image) and "
            f"{streams} hold all but one of its {self.workers} handler threads (--workers), which is "
            f"kept for health checks and lookups; {refused}, send again shortly")

    def _refusal(self, message: str) -> ServerBusyError:
        """The error for a call refused as busy (under the lock), counted in a log line at most
        every REFUSALS_LOG_EVERY_S: at once after a quiet spell, else by a timer at the end of
        the spell, so that no count waits for a refusal that may never come."""
        self._refused += 1
        if self._log_timer is None:
            wait = self._refusals_logged_at + REFUSALS_LOG_EVERY_S - time.monotonic()
            if wait <= 0:
                self._log_refusals()
            else:
                self._log_timer = threading.Timer(wait, self.flush_refusals)
                self._log_timer.daemon = True
                self._log_timer.start()
        return ServerBusyError(message)

    def flush_refusals(self) -> None:
        """Log the refusals counted since the last line, if any (the timer; the server's stop)."""
        with self._lock:
            if self._log_timer is not None:
                self._log_timer.cancel()
                self._log_timer = None
            if self._refused:
                self._log_refusals()

    def _log_refusals(self) -> None:
        log.warning("calls refused as busy since the last such line: %d (the handler threads that calls "
                    "running the model and streams may hold were all held: raise --workers for more "
                    "clients at once)", self._refused)
        self._refused, self._refusals_logged_at = 0, time.monotonic()


def idle_limited(requests: Iterator[T], idle_s: float, stream: str) -> Iterator[T]:
    """The messages of a client stream (``stream`` names it in errors), waiting at most
    ``idle_s`` for each.

    gRPC's request iterator blocks until the client sends, closes or cancels: a client that
    opens a stream without a deadline and goes quiet would hold a stream slot and a handler
    thread forever. So a reader thread takes the messages and this generator waits on it with
    a timeout. The time spent on a message does not count: the reader reads ahead (a few
    messages, which bounds the memory), and the clock runs only while this side waits.
    """
    ahead: queue.Queue[object] = queue.Queue(maxsize=4)
    finished = threading.Event()

    def put(entry: object) -> bool:
        while not finished.is_set():  # the handler may have stopped reading (an error)
            try:
                ahead.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for request in requests:
                if not put(request):
                    return
            put(_STREAM_END)
        except Exception as e:  # gRPC's cancel (RpcError) or a malformed message: the handler raises it
            put(e)

    threading.Thread(target=read, name=f"pictor-{stream}-reader", daemon=True).start()
    try:
        while True:
            try:
                entry = ahead.get(timeout=idle_s)
            except queue.Empty:
                raise DeadlineExceededError(
                    f"the {stream} stream sent nothing for {idle_s:g} s and was ended: send each "
                    "message within that time of the last and close the stream after the last one "
                    "(the server's --upsert-idle-timeout sets the time)"
                ) from None
            if entry is _STREAM_END:
                return
            if isinstance(entry, grpc.RpcError):  # cancelled: by the client, its deadline, or the server stopping
                raise DeadlineExceededError(
                    f"the {stream} stream was cancelled before its last message (by the client, its "
                    "deadline, or the server shutting down)"
                ) from entry
            if isinstance(entry, Exception):
                raise entry
            yield cast(T, entry)
    finally:
        finished.set()  # the reader ends once gRPC ends the call (next() then raises)


def _filter_of(request: pb.SearchRequest | pb.ListRequest) -> Filter | None:
    if not request.HasField("filter"):
        return None
    return Filter(labels=tuple(request.filter.labels), attributes=dict(request.filter.attributes))


def _arrived(item: pb.Item, position: int) -> pb.Item:
    """An Upsert item checked as it arrives: a client that sent a bad one and kept its stream
    open had been told only that the stream went quiet."""
    check_upsert_item(item.key, bool(item.image), item.HasField("vector"), position)
    return item


def _items(n: int) -> str:
    return f"{n} item{'' if n == 1 else 's'}"


class PictorService(pb_grpc.PictorServicer):
    def __init__(self, engine: Engine, threads: HandlerThreads, upsert_idle_s: float, max_reply_bytes: int) -> None:
        self.engine = engine
        self.upsert_idle_s = upsert_idle_s
        self.threads = threads
        self.max_reply_bytes = max_reply_bytes  # the server's grpc.max_send_message_length

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        if not 0 <= request.classifier < len(CLASSIFIERS):
            raise InvalidRequestError(f"unknown classifier value {request.classifier}")
        classifier = CLASSIFIERS[request.classifier]
        check_active(context, "classifying")
        with self.threads.model_call(refused="the image was not classified"):
            result = self.engine.classify(
                request.image, top_k=request.top_k, classifier=classifier, neighbors=request.neighbors
            )
        return classify_to_pb(result)

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        which = request.WhichOneof("query")
        params = (SearchParams(nprobe=request.params.nprobe, ef_search=request.params.ef_search)
                  if request.HasField("params") else None)
        if which == "image":  # a lookup by key or vector is too cheap to be worth skipping
            check_active(context, "searching")
        with self.threads.model_call(refused="nothing was searched") if which == "image" else contextlib.nullcontext():
            hits = self.engine.search(
                image=request.image if which == "image" else None,
                key=request.key if which == "key" else None,
                vector=list(request.vector.values) if which == "vector" else None,
                k=request.k,
                filter=_filter_of(request),
                params=params,
            )
        response = pb.SearchResponse()
        add_hits(response.hits, hits)
        return response

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        check_active(context, "embedding")
        with self.threads.model_call(refused="nothing was embedded"):
            embeddings = self.engine.embed(list(request.images))
        return pb.EmbedResponse(
            embeddings=[pb.Vector(values=row.tolist()) for row in embeddings],
            dim=self.engine.spec.dim,
            backbone=self.engine.spec.backbone,
        )

    def Upsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext) -> pb.UpsertResponse:
        with self.threads.stream(refused="nothing was written"):
            return self._upsert(request_iterator, context)

    def _upsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext) -> pb.UpsertResponse:
        inserted = replaced = 0
        try:
            requests = idle_limited(request_iterator, self.upsert_idle_s, "upsert")
            items = (_arrived(r.item, i) for i, r in enumerate(requests))
            for n, chunk in enumerate(batched(items, UPSERT_CHUNK)):
                result = self._upsert_chunk(chunk, context, first=n * UPSERT_CHUNK)
                inserted, replaced = inserted + result.inserted, replaced + result.replaced
        except PictorError as e:  # a bad item, or the stream ended early: say what is written
            if written := inserted + replaced:
                raise type(e)(f"{e}; the first {_items(written)} of the stream were written") from e
            if isinstance(e, DeadlineExceededError):
                raise DeadlineExceededError(f"{e}; nothing of this stream was written") from e
            raise
        if not (inserted or replaced):
            raise InvalidRequestError("upsert stream carried no items")
        return pb.UpsertResponse(inserted=inserted, replaced=replaced)

    def _upsert_chunk(self, chunk: list[pb.Item], context: grpc.ServicerContext, first: int) -> UpsertResult:
        # gRPC ends the request iterator of a stream cut off by its deadline as if its client
        # had closed it, and marks the call ended a moment later: the unfinished chunk of 1 in
        # 10 such streams was written. A short chunk comes after the stream's end.
        if len(chunk) < UPSERT_CHUNK and context.time_remaining() < DEADLINE_MARGIN_S:
            raise DeadlineExceededError(
                f"the stream ended within {DEADLINE_MARGIN_S * 1000:.0f} ms of its deadline, as a stream cut "
                "off by it does, so its last items were not written; allow the call more time")
        items = [Item(key=i.key, label=i.label, attributes=dict(i.attributes)) for i in chunk]
        images = [i.image or None for i in chunk]
        vectors = [list(i.vector.values) if i.HasField("vector") else None for i in chunk]
        return self.engine.upsert(items, images, vectors, first=first,
                                  before_write=lambda: check_active(context, "writing these items"))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        result = self.engine.delete(list(request.keys), before_write=lambda: check_active(context, "deleting"))
        return pb.DeleteResponse(deleted=result.deleted, missing=list(result.missing))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        page = self.engine.list_items(request.after, request.limit or MAX_LIST, _filter_of(request))
        response = pb.ListResponse(next=page.next)
        # A page ends early where its items would not fit in a reply: 1000 items with large
        # attributes are 69 MB, and a listing must not stop at a page it cannot send.
        room = self.max_reply_bytes - _LIST_REPLY_MARGIN
        for item in page.items:
            added = response.items.add(key=item.key, label=item.label)
            added.attributes.update(item.attributes)
            room -= added.ByteSize() + 8  # and its field's tag and length
            if room < 0 and len(response.items) > 1:
                del response.items[-1]
                response.next = response.items[-1].key
                break
        return response

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        result = self.engine.get(list(request.keys), vectors=request.vectors)
        response = pb.GetResponse(missing=result.missing)
        for i, item in enumerate(result.items):
            out = response.items.add(key=item.key, label=item.label)
            out.attributes.update(item.attributes)
            if result.vectors is not None:
                out.vector.values.extend(result.vectors[i].tolist())
        return response

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(**dataclasses.asdict(self.engine.info()))
