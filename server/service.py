"""The gRPC servicer: protobuf messages in, engine calls, protobuf messages out.

Translation, and the limits of limits.py applied per method; errors propagate as domain
errors and the error interceptor (errors.py) turns them into status codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from pictor.api import CLASSIFIERS, MAX_LIST, UPSERT_CHUNK
from pictor.core.store import Filter, Hits, Item, SearchParams, UpsertResult
from pictor.errors import DeadlineExceededError, InvalidRequestError, PictorError
from pictor.iterators import batched
from pictor.server.engine import ClassifyResult, Engine, check_upsert_item
from pictor.server.errors import reply_over_limit
from pictor.server.limits import HandlerThreads, check_active, idle_limited
from pictor.v1 import pictor_pb2 as pb
from pictor.v1 import pictor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer


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


_LIST_REPLY_MARGIN = 64 * 1024  # of a List reply, for its `next` key (at most 16 KB as UTF-8)


def _filter_of(request: pb.SearchRequest | pb.ListRequest) -> Filter | None:
    if not request.HasField("filter"):
        return None
    return Filter(labels=tuple(request.filter.labels), attributes=dict(request.filter.attributes))


def _arrived(item: pb.Item, position: int) -> pb.Item:
    """An Upsert item checked as it arrives: a client that sent a bad one and kept its stream
    open had been told only that the stream went quiet."""
    check_upsert_item(item.key, bool(item.image), item.HasField("vector"), position)
    return item


def _add_item(items: RepeatedCompositeFieldContainer[pb.Item], item: Item) -> pb.Item:
    """``item`` added to a reply's repeated Item field (List, Get)."""
    added = items.add(key=item.key, label=item.label)
    added.attributes.update(item.attributes)
    return added


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
            named = ", ".join(f"{i} {pb.Classifier.Name(i)}" for i in range(len(CLASSIFIERS)))
            raise InvalidRequestError(f"unknown classifier value {request.classifier}; choose from {named}")
        classifier = CLASSIFIERS[request.classifier]
        with self._model_call(context, "classifying", refused="the image was not classified") as still_wanted:
            result = self.engine.classify(
                request.image, top_k=request.top_k, classifier=classifier, neighbors=request.neighbors,
                still_wanted=still_wanted,
            )
        return classify_to_pb(result)

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        which = request.WhichOneof("query")
        params = (SearchParams(nprobe=request.params.nprobe, ef_search=request.params.ef_search)
                  if request.HasField("params") else None)
        # A lookup by key or vector is too cheap to be worth skipping, and waits for no model.
        with (self._model_call(context, "searching", refused="nothing was searched") if which == "image"
              else contextlib.nullcontext(None)) as still_wanted:
            hits = self.engine.search(
                image=request.image if which == "image" else None,
                key=request.key if which == "key" else None,
                vector=list(request.vector.values) if which == "vector" else None,
                k=request.k,
                filter=_filter_of(request),
                params=params,
                still_wanted=still_wanted,
            )
        response = pb.SearchResponse()
        add_hits(response.hits, hits)
        return response

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        check_active(context, "embedding")  # before the reply's size is worked out
        # Its size is known before any image is decoded (each vector's is the same): a reply over
        # the limit is refused now, not after the forward pass.
        none, one = (self._embed_response(np.zeros((n, self.engine.spec.dim), np.float32)).ByteSize() for n in (0, 1))
        if (size := none + len(request.images) * (one - none)) > self.max_reply_bytes:
            raise InvalidRequestError(reply_over_limit(size, self.max_reply_bytes, "Embed"))
        with self._model_call(context, "embedding", refused="nothing was embedded") as still_wanted:
            embeddings = self.engine.embed(list(request.images), still_wanted=still_wanted)
        return self._embed_response(embeddings)

    @contextlib.contextmanager
    def _model_call(self, context: grpc.ServicerContext, doing: str, *, refused: str
                    ) -> Iterator[Callable[[], None]]:
        """A call that will wait for the model: skipped if its caller has gone already, counted
        among the calls that may hold handler threads (``refused`` says what a busy refusal did
        not do), and given the check the engine repeats while it waits (``still_wanted``)."""
        check_active(context, doing)
        with self.threads.waiting_call(refused=refused):
            yield lambda: check_active(context, doing)

    def _embed_response(self, embeddings: np.ndarray) -> pb.EmbedResponse:
        return pb.EmbedResponse(embeddings=[pb.Vector(values=row.tolist()) for row in embeddings],
                                dim=self.engine.spec.dim, backbone=self.engine.spec.backbone)

    def Upsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext) -> pb.UpsertResponse:
        with self.threads.stream(refused="nothing was written"):
            return self._upsert(request_iterator, context)

    def _upsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext) -> pb.UpsertResponse:
        inserted = replaced = unwritten = 0
        final = pb.UpsertRequest()

        def items() -> Iterator[pb.Item]:
            nonlocal final
            for i, request in enumerate(idle_limited(request_iterator, self.upsert_idle_s, "upsert")):
                if final.last:
                    raise InvalidRequestError(f"message {i} (counting from 0) came after the one marked `last`, "
                                              "which must be the stream's final message")
                final = request
                if request.HasField("item") or not request.last:  # (a bare `last` message only ends the stream)
                    yield _arrived(request.item, i)

        try:
            for n, chunk in enumerate(batched(items(), UPSERT_CHUNK)):
                # A short chunk comes after the stream's end, which gRPC also delivers for a stream
                # cut off (cancelled, deadline): under load, 4 in 300 whose client's items failed
                # had it written. Only the client's mark tells the two apart.
                if len(chunk) < UPSERT_CHUNK and not final.last:
                    unwritten = len(chunk)
                    break
                result = self._upsert_chunk(chunk, context, first=n * UPSERT_CHUNK)
                inserted, replaced = inserted + result.inserted, replaced + result.replaced
            if not final.last and (inserted or replaced or unwritten):
                lost = (f", so the {_items(unwritten)} after its last full chunk {'was' if unwritten == 1 else 'were'}"
                        " not written" if unwritten else "")
                raise InvalidRequestError(
                    "the stream's final message was not marked `last`, as a stream cut off (cancelled, its deadline "
                    f"passed, its client failed) ends{lost}; mark the final message last (PictorClient 0.2 and later does)")
        except PictorError as e:  # a bad item, or the stream ended early: say what is written
            if written := inserted + replaced:
                raise type(e)(f"{e}; the first {_items(written)} of the stream were written") from e
            if isinstance(e, DeadlineExceededError):
                raise DeadlineExceededError(f"{e}; nothing of this stream was written") from e
            raise
        except Exception as e:  # a bug, or the disk failing: the reply still says what is written
            if written := inserted + replaced:
                e.add_note(f"the first {_items(written)} of the stream were written")
            raise
        if not (inserted or replaced):
            raise InvalidRequestError("upsert stream carried no items")
        return pb.UpsertResponse(inserted=inserted, replaced=replaced)

    def _upsert_chunk(self, chunk: list[pb.Item], context: grpc.ServicerContext, first: int) -> UpsertResult:
        items = [Item(key=i.key, label=i.label, attributes=dict(i.attributes)) for i in chunk]
        images = [i.image or None for i in chunk]
        vectors = [list(i.vector.values) if i.HasField("vector") else None for i in chunk]
        return self.engine.upsert(items, images, vectors, first=first,
                                  before_write=lambda: check_active(context, "writing these items"))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        # A delete waits for the store's write lock, held through a rebuild of the index.
        with self.threads.waiting_call(refused="nothing was deleted"):
            result = self.engine.delete(list(request.keys), before_write=lambda: check_active(context, "deleting"))
        return pb.DeleteResponse(deleted=result.deleted, missing=list(result.missing))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        if not 0 <= request.limit <= MAX_LIST:  # (the store's own words would not say that 0 is the default)
            raise InvalidRequestError(f"limit must be between 1 and {MAX_LIST} (or 0 for {MAX_LIST}), got {request.limit}")
        page = self.engine.list_items(request.after, request.limit or MAX_LIST, _filter_of(request))
        response = pb.ListResponse(next=page.next)
        # A page ends early where its items would not fit in a reply: 1000 items with large
        # attributes are 69 MB, and a listing must not stop at a page it cannot send.
        room = self.max_reply_bytes - _LIST_REPLY_MARGIN
        for item in page.items:
            added = _add_item(response.items, item)
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
            out = _add_item(response.items, item)
            if result.vectors is not None:
                out.vector.values.extend(result.vectors[i].tolist())
        return response

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(**dataclasses.asdict(self.engine.info()))
