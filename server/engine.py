"""What the server does, free of gRPC: decode, embed, classify, search, update.

``PictorService`` (service.py) translates protobuf messages to calls on this engine and back;
errors raised here are typed domain errors that the error interceptor maps to status codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pictor import __version__
from pictor.api import (
    CLASSIFIERS,
    DEFAULT_K,
    DEFAULT_NEIGHBORS,
    DEFAULT_TOP_K,
    MAX_EMBED_IMAGES,
    MAX_GET_KEYS,
    MAX_K,
    OpenSetCheck,
    ServerInfo,
)
from pictor.config import ServerSettings
from pictor.core.decode import decode_image
from pictor.core.files import content_hash
from pictor.core.head import top_k_labels
from pictor.core.store import (
    DeleteResult,
    Filter,
    GetResult,
    Hit,
    Hits,
    IndexStore,
    Item,
    ItemPage,
    SearchParams,
    StoreInfo,
    UpsertResult,
)
from pictor.core.whitening import PCAWhitening, index_spec, open_index
from pictor.errors import IncompatibleModelError, InvalidImageError, InvalidRequestError, shown
from pictor.server.batching import Batcher

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder, EmbedOutput
    from pictor.core.head import TrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifyResult:
    labels: list[tuple[str, float]]
    source: str  # "imagenet", "head" or "knn"
    knn_labels: list[tuple[str, float]] = field(default_factory=list)
    neighbors: Hits = field(default_factory=Hits)
    agree: bool = False
    open_set: OpenSetCheck | None = None  # with an open-set model: its verdict and the evidence

    @property
    def unknown(self) -> bool:
        return self.open_set is not None and self.open_set.unknown


def _check_keys(keys: Sequence[str], call: str) -> None:
    if not keys:
        raise InvalidRequestError(f"{call} got no keys")
    if "" in keys:
        raise InvalidRequestError(f"{call}: key {list(keys).index('')} is empty; no item has an empty key")


def check_upsert_item(key: str, has_image: bool, has_vector: bool, position: int) -> None:
    """The checks of one Upsert item that need no other: the server makes them as each item
    arrives, so a bad item fails its stream at once, not when its chunk of 64 is full."""
    if not key:
        raise InvalidRequestError(f"item {position} (counting from 0) has no key")
    if not has_image and not has_vector:
        raise InvalidRequestError(f"item {shown(key, 200)} has neither image nor vector")
    if has_image and has_vector:
        raise InvalidRequestError(f"item {shown(key, 200)} has both an image and a vector; give one")


def query_item_first(own: Hit, hits: Hits, k: int) -> Hits:
    """The query's own item, then ``hits`` without it, ``k`` in all. Copies of it under other
    keys tie with it and come in the index's order, and an approximate index can miss the
    item altogether (HNSW did for 2 of 300 random vectors): neither may displace it."""
    return Hits.of([own, *(h for h in hits if h.key != own.key)][:k])


def check_k(value: int, default: int, name: str) -> int:
    """``value`` or ``default`` when 0; refuse values beyond ``MAX_K``."""
    if value == 0:
        return default
    if not 1 <= value <= MAX_K:
        raise InvalidRequestError(f"{name} must be between 1 and {MAX_K} (or 0 for {default}), got {value}")
    return value


class Engine:
    """One embedder, one index store and an optional fine-tuned head, shared by all requests.

    With a PCA-whitened index, the vectors the API exchanges (Embed, Search and Upsert
    vectors, kNN queries) are whitened; the head still gets the embedder's own embeddings.
    """

    def __init__(
        self,
        embedder: Embedder,
        store: IndexStore,
        model: TrainedModel | None = None,
        *,
        max_pixels: int,
        batch_size: int,
        max_queue_delay_s: float = 0.0,
        whitening: PCAWhitening | None = None,
    ) -> None:
        self.spec = index_spec(embedder.spec, whitening)  # the space of the index's vectors
        store.spec.check_compatible(self.spec, what="the server's model")
        self.whitening = whitening
        self.embedder = embedder
        self.store = store
        self.model = model
        self.max_pixels = max_pixels
        self._why_neighbours_off: str | None = None  # see _neighbour_tests_off
        self._checked_at_seq = -1  # the index's write number when that was last checked
        self._checked_for: TrainedModel | None = None  # ... and for which model
        # They change together: two Classify calls rechecking at once could otherwise store an
        # older answer under a newer write number, kept until the next write.
        self._open_set_lock = threading.Lock()
        if model is not None and model.open_set is not None:
            self._neighbour_tests_off(model)  # logs when they are off
        # One forward pass at a time (concurrent passes would only fight over the same cores),
        # for the images of every call waiting for the model, up to ``batch_size`` of them.
        self.batcher = Batcher(self._forward_parts, batch_size, max_delay_s=max_queue_delay_s)
        # Told of each call's images: (images, seconds decoding, waiting for the model, its pass).
        self.on_forward: Callable[[int, float, float, float], None] | None = None

    @classmethod
    def load(cls, settings: ServerSettings) -> Engine:
        """Open the index and build the model it was made with (or the fine-tuned one)."""
        from pictor.core.embedder import embedder_for_index, kept_precision, warn_mixed_precision

        index = settings.index
        # writes go on while a grown index is rebuilt, from the first moment
        store, whitening, spec = open_index(index, rebuild_in_background=True)
        with contextlib.ExitStack() as on_error:
            on_error.callback(store.close, snapshot=False)  # a refused start must not keep the index locked
            model = None
            if settings.model:
                from pictor.core.head import load_model

                model = load_model(settings.model)
                model.check_index(spec)  # the head takes unwhitened embeddings
                embedder = model.create_embedder(device=settings.device,
                                                 precision=settings.precision,
                                                 compile=settings.compile,
                                                 weights=settings.weights or None)
            else:
                embedder = embedder_for_index(
                    spec, index, weights=settings.weights, device=settings.device, compile=settings.compile,
                    precision=kept_precision(settings.precision, store.precision, settings.device))
            warn_mixed_precision(index, store.precision, embedder.precision, "queries and added images are embedded")
            engine = cls(embedder, store, model, max_pixels=settings.max_pixels, batch_size=settings.batch_size,
                         max_queue_delay_s=settings.max_queue_delay_ms / 1000, whitening=whitening)
            if not settings.compile:  # (compiled at the first call, as --compile says)
                engine.warm_up()
            on_error.pop_all()  # started: the engine closes the store
        return engine

    def reload_model(self, path: str) -> TrainedModel:
        """Serve the model file at ``path`` from the next call on; calls in flight finish with
        the model they began with. Raises, and the served model stays, when the file cannot be
        read or its head does not take this server's embeddings (a head trained on another
        backbone, or one that fine-tuned its own: its index must be rebuilt)."""
        from pictor.core.head import load_model

        model = load_model(path)
        try:
            model.check_index(self.embedder.spec)
        except IncompatibleModelError as e:
            raise IncompatibleModelError(f"{e}, and restart the server with both (a reload serves only a head for "
                                         "the embeddings served now)") from e
        model.warn_of_precision(self.embedder.precision)
        self.model = model
        if model.open_set is not None:
            self._neighbour_tests_off(model)  # logs when they are off
        return model

    def _neighbour_tests_off(self, model: TrainedModel) -> str | None:
        """Why the index's similarities cannot serve ``model``'s open-set neighbour tests (see
        ``neighbour_tests_off``; None when they can); then the class fit decides alone.

        Redone after every write to the index (one index lookup per class), so classes upserted
        into a running server turn the tests on, and deleting or relabelling the last item of a
        class turns them off; and for a reloaded model."""
        with self._open_set_lock:
            seq = self.store.seq  # read first: a write after it makes the next call check again
            if seq != self._checked_at_seq or model is not self._checked_for:
                from pictor.core.open_set import neighbour_tests_off

                was_off = self._why_neighbours_off
                self._why_neighbours_off = why = neighbour_tests_off(self.store, model.class_names)
                self._checked_at_seq, self._checked_for = seq, model
                if why and why != was_off:
                    log.warning("open set: %s; 'unknown' is decided by the class-fit score alone", why)
                elif was_off and not why:
                    log.info("open set: the index holds items of every class of the model; neighbour tests on")
            return self._why_neighbours_off

    def close(self) -> None:
        self.store.close()

    # -- embedding ---------------------------------------------------------------------------

    def forward(self, images: Sequence[bytes], names: Sequence[str] = (), *,
                still_wanted: Callable[[], None] | None = None) -> EmbedOutput:
        """Decode and embed image bytes, in the model's next pass with those of the other calls
        waiting for it (``Batcher``; a list larger than a pass is a pass of its own, in chunks).

        An undecodable image fails the call with a message naming it: by ``names[i]`` when
        given, else by its position when there are several. ``still_wanted`` runs before each
        image is decoded, every ``Batcher.GONE_POLL_S`` while the call waits for the model and
        once the forward pass is its turn, and may raise to call it off (the server's check that
        the caller is still waiting: its deadline may pass while it decodes, or behind other calls).
        """
        if not images:
            raise InvalidRequestError("no image given")
        started = time.perf_counter()
        tensors = []
        for i, data in enumerate(images):
            if still_wanted is not None:  # an Embed of 256 large images decodes for a while
                still_wanted()
            try:
                # draft: a large JPEG is decoded at reduced scale, never below what the model needs
                image = decode_image(data, max_pixels=self.max_pixels, draft_size=self.embedder.draft_size)
            except InvalidImageError as e:
                if len(images) == 1 and not names:
                    raise
                raise InvalidImageError(f"{names[i] if names else f'image {i}'}: {e}") from e
            # Preprocessed at once: a request holds one full-size decoded image at a time, not all
            # of them (256 small PNGs of 40 MP each would decode to 30 GB).
            tensors.append(self.embedder.preprocess(image))
            del image
        decoded = time.perf_counter()
        turn = self.batcher(tensors, still_wanted)
        if self.on_forward is not None:
            self.on_forward(len(tensors), decoded - started, turn.began - decoded, turn.seconds)
        return turn.result

    def warm_up(self) -> None:
        """A pass of a batch of blank images before the first call: it sets up the model's kernels
        and buffers (a GPU's too), and after a pass of several images, passes of one ran faster on
        a CPU (efficientnet_lite0 here: 19 vs 24 ms; the allocator keeps the memory it then holds;
        a server without it answered one client 22 Classify calls/s, with it 26-27)."""
        from PIL import Image

        started = time.perf_counter()
        n = min(self.batcher.max_items, 64)
        self.embedder.forward_preprocessed([self.embedder.preprocess(Image.new("RGB", (8, 8)))] * n, n)
        log.info("model warmed up: a pass of %d blank images took %.2fs", n, time.perf_counter() - started)

    def _forward_parts(self, calls: list[list[torch.Tensor]]) -> list[EmbedOutput]:
        """The batcher's pass: the calls' images in one forward pass, each call's rows back."""
        from pictor.core.embedder import EmbedOutput

        out = self.embedder.forward_preprocessed([t for tensors in calls for t in tensors], self.batcher.max_items)
        ends = np.cumsum([len(tensors) for tensors in calls])[:-1]
        logits = [None] * len(calls) if out.logits is None else np.split(out.logits, ends)
        return [EmbedOutput(e, lg) for e, lg in zip(np.split(out.embeddings, ends), logits, strict=True)]

    def to_index(self, embeddings: np.ndarray) -> np.ndarray:
        """Embedder output -> the index's space (whitened when the index is)."""
        return embeddings if self.whitening is None else self.whitening.apply(embeddings)

    def embed(self, images: Sequence[bytes], *, still_wanted: Callable[[], None] | None = None) -> np.ndarray:
        """Embeddings as the index stores them: what Search and Upsert take as vectors."""
        if len(images) > MAX_EMBED_IMAGES:
            raise InvalidRequestError(f"Embed takes at most {MAX_EMBED_IMAGES} images per call, "
                                      f"got {len(images)}; split the request")
        return self.to_index(self.forward(images, still_wanted=still_wanted).embeddings)

    def query_vector(self, values: Sequence[float]) -> np.ndarray:
        vector = np.asarray(values, dtype=np.float32)
        if vector.shape != (self.store.spec.dim,):
            whitened = f" ({self.spec.whitening}: Embed returns such vectors)" if self.whitening else ""
            raise InvalidRequestError(
                f"vector has {vector.size} value{'' if vector.size == 1 else 's'}, but this index holds {self.store.spec.dim}-d vectors{whitened}"
            )
        return self.store.check_vectors(vector, what="vector")[0]  # finite, not zero, normalised

    # -- the calls ---------------------------------------------------------------------------

    def classify(
        self, image: bytes, *, top_k: int = 0, classifier: str = "default", neighbors: int = 0,
        still_wanted: Callable[[], None] | None = None,
    ) -> ClassifyResult:
        if classifier not in CLASSIFIERS:
            raise InvalidRequestError(f"unknown classifier {classifier!r}; choose from {CLASSIFIERS}")
        top_k = check_k(top_k, DEFAULT_TOP_K, "top_k")
        n_neighbors = check_k(neighbors, DEFAULT_NEIGHBORS, "neighbors")
        model = self.model  # read once: a reload swaps it for the calls that come after this one
        out = self.forward([image], still_wanted=still_wanted)
        embedding = out.embeddings[0]

        logits, imagenet_classes = out.logits, self.embedder.imagenet_classes  # locals: mypy narrows them
        has_imagenet = logits is not None and bool(imagenet_classes)
        # kNN when asked for, or as the default of a server with neither head nor ImageNet
        # labels (random init, or a checkpoint without its classifier).
        if classifier == "knn" or (model is None and not has_imagenet and classifier != "head"):
            knn, hits = self._knn(embedding, n_neighbors, top_k)
            if not knn and classifier != "all" and not self.store.has_labels():  # no vote, for any image
                other = ", or ask for the default classifier" if model is not None or has_imagenet else ""
                raise InvalidRequestError(
                    "the kNN vote counts the labels of the nearest indexed items, and no item of this index "
                    "has a label: index labelled images (a folder per label, a manifest's label column, "
                    f"or an item's label: `pictor add --label`){other}")
            return ClassifyResult(labels=knn, source="knn", knn_labels=knn, neighbors=hits,
                                  open_set=self._open_set_check(model, embedding, hits))

        if model is not None:
            labels, source = model.top_k(embedding[None], top_k)[0], "head"
        elif logits is not None and imagenet_classes:  # has_imagenet, spelled out for mypy
            probs = torch.from_numpy(logits[0]).double().softmax(0).numpy()
            labels, source = top_k_labels(probs, imagenet_classes, top_k), "imagenet"
        else:
            instead = ("ask for the kNN vote over the index (CLASSIFIER_KNN: `pictor classify --classifier knn`)"
                       if self.store.has_labels() else "label the index's items for a kNN vote")
            raise InvalidRequestError(
                f"this server has no classifier head (no --model, and a backbone without ImageNet labels); {instead}")
        if classifier != "all" and (model is None or model.open_set is None):
            return ClassifyResult(labels=labels, source=source)

        # Open-set rejection needs the nearest neighbour too, whichever answer was asked for.
        knn, hits = self._knn(embedding, n_neighbors, top_k)
        check = self._open_set_check(model, embedding, hits)
        if classifier != "all":
            return ClassifyResult(labels=labels, source=source, open_set=check)
        # ImageNet labels are not the index's labels: agreement means nothing there.
        agree = source == "head" and bool(knn) and knn[0][0] == labels[0][0]
        return ClassifyResult(
            labels=labels, source=source, knn_labels=knn, neighbors=hits, agree=agree, open_set=check
        )

    def _open_set_check(self, model: TrainedModel | None, embedding: np.ndarray, hits: Hits) -> OpenSetCheck | None:
        """``model``'s open-set verdict (None without an open-set model), whichever classifier
        answered. The class Gaussians take the embedder's own embedding, like the head."""
        if model is None or model.open_set is None:
            return None
        open_set = model.open_set
        fit = float(open_set.gaussians.score(embedding[None])[0])
        sim = self._nearest_known(model, embedding, hits)
        return OpenSetCheck(fit, None if math.isnan(sim) else sim, open_set.thresholds.why_unknown(fit, sim))

    def _nearest_known(self, model: TrainedModel, embedding: np.ndarray, hits: Hits) -> float:
        """Similarity of the nearest indexed item of ``model``'s classes: the first of ``hits``
        when it is one, else a search for it. NaN when the neighbour tests are off (see
        ``_neighbour_tests_off``): the class fit decides alone."""
        from pictor.core.open_set import open_set_similarities

        tests_off = self._neighbour_tests_off(model)
        if not tests_off and hits and hits[0].label in model.class_names:
            return hits[0].score  # the nearest of all is the nearest of the model's classes: no search
        return float(open_set_similarities(self.store, embedding[None], model.class_names, tests_off)[0])

    def _knn(self, embedding: np.ndarray, n: int, top_k: int) -> tuple[list[tuple[str, float]], Hits]:
        from pictor.core.head import knn_vote

        hits = self.store.search(self.to_index(embedding[None]), n)[0]
        return knn_vote(hits)[:top_k], hits

    def search(
        self,
        *,
        image: bytes | None = None,
        key: str | None = None,
        vector: Sequence[float] | None = None,
        k: int = 0,
        filter: Filter | None = None,
        params: SearchParams | None = None,
        still_wanted: Callable[[], None] | None = None,
    ) -> Hits:
        k = check_k(k, DEFAULT_K, "k")
        if image is not None:
            query = self.embed([image], still_wanted=still_wanted)[0]
        elif key is not None:
            item, query = self.store.get_item(key)
            if filter is None or filter.admits(item):  # else a plain search of its neighbours
                own = Hit(item.key, float(query @ query), item.label, item.attributes)
                others = self.store.search(query[None], k + 1, filter=filter, params=params)[0]
                return query_item_first(own, others, k)
        elif vector is not None:
            query = self.query_vector(vector)
        else:
            raise InvalidRequestError("search needs a query: image bytes, a stored key, or a vector")
        return self.store.search(query[None], k, filter=filter, params=params)[0]

    def upsert(self, items: Sequence[Item], images: Sequence[bytes | None],
               vectors: Sequence[Sequence[float] | None], *,
               before_write: Callable[[], None] | None = None, first: int = 0) -> UpsertResult:
        """Embed what came as images, check what came as vectors, write all in one durable step.

        ``before_write`` runs where ``forward``'s ``still_wanted`` does (images only) and once the
        store's write lock is held, and may raise to call the write off (the server's check that
        the caller is still waiting). ``first`` is the position of ``items[0]`` in the caller's
        stream, for errors that can only name an item by position."""
        if not items:
            raise InvalidRequestError("upsert got no items")
        rows = np.empty((len(items), self.store.spec.dim), dtype=np.float32)
        to_embed = [i for i, img in enumerate(images) if img]
        for i, (item, img, vec) in enumerate(zip(items, images, vectors, strict=True)):
            check_upsert_item(item.key, bool(img), vec is not None, first + i)
            if not img:
                try:
                    rows[i] = self.query_vector(vec)  # type: ignore[arg-type]
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"item {shown(item.key, 200)}: {e}") from e
        if to_embed:
            try:
                out = self.forward([images[i] for i in to_embed],  # type: ignore[misc]
                                   [f"item {shown(items[i].key, 200)}" for i in to_embed], still_wanted=before_write)
            except InvalidImageError as e:
                n = len(items)
                raise InvalidImageError(f"{e}; " + ("the item was not written" if n == 1 else
                                                    f"none of these {n} items were written")) from e
            rows[to_embed] = self.to_index(out.embeddings)
        # An image's hash, as `pictor index` keeps a file's: indexing that file later with the
        # same key, label and attributes leaves this item as it is.
        hashed = [dataclasses.replace(it, content_hash=content_hash(img)) if img else it
                  for it, img in zip(items, images, strict=True)]
        return self.store.upsert(hashed, rows, before_write=before_write)

    def delete(self, keys: Sequence[str], *, before_write: Callable[[], None] | None = None) -> DeleteResult:
        _check_keys(keys, "delete")
        return self.store.delete(keys, before_write=before_write)

    def unavailable(self) -> str | None:
        """Why the server can take no more writes, or None: what health checks report (asked of
        the engine, not of a store object, so that a reloaded index is the one checked)."""
        return self.store.unavailable()

    def list_items(self, after: str, limit: int, filter: Filter | None) -> ItemPage:
        return self.store.list_items(after, limit, filter)

    def get(self, keys: Sequence[str], *, vectors: bool = False) -> GetResult:
        _check_keys(keys, "get")
        distinct = len(set(keys))  # a key asked twice is answered once
        if distinct > MAX_GET_KEYS:
            raise InvalidRequestError(f"get takes at most {MAX_GET_KEYS} distinct keys per call, got {distinct}")
        return self.store.get(keys, vectors=vectors)

    def info(self) -> ServerInfo:
        import faiss

        spec = self.spec
        store_info = self.store.info()
        label_counts = self.store.label_counts()  # and the size from it: one state, though writes go on
        model = self.model  # read once: a reload may swap it meanwhile
        if model is not None:
            classifier, names = "head", list(model.class_names)
        elif self.embedder.imagenet_classes:
            classifier, names = "imagenet", list(self.embedder.imagenet_classes)
        else:  # what Classify answers by default then: the index's labels
            classifier, names = "knn", []
        return ServerInfo(
            backbone=spec.backbone,
            weights=spec.weights,
            embedding_dim=spec.dim,
            index_size=sum(label_counts.values()),
            # what was asked for, and what FAISS runs now: "auto (Flat)", "HNSW32",
            # "auto (Flat); rebuilding as PCA128,IVF..."
            index_type=_index_type_text(store_info),
            metric=store_info.metric,
            classifier=classifier,
            class_names=names,
            server_version=__version__,
            versions={"torch": torch.__version__, "faiss": faiss.__version__, "pictor": __version__},
            open_set=self._open_set_status(model),
            finetune=spec.finetune[:12],
            pooling=spec.pooling,
            layer=spec.layer,
            label_counts=label_counts,
            whitening=spec.whitening,
            model_sha256=model.file_sha256 if model is not None else "",
        )

    def _open_set_status(self, model: TrainedModel | None) -> str:
        if model is None or model.open_set is None:
            return ""
        rule = model.open_set.thresholds
        why = self._neighbour_tests_off(model)
        return f"class fit alone: {why}; {rule.describe(neighbours=False)}" if why else f"on: {rule.describe()}"


def _index_type_text(info: StoreInfo) -> str:
    """What was asked for, what FAISS runs now, and what a background rebuild is making."""
    text = info.factory if info.index_type == info.factory else f"{info.index_type} ({info.factory})"
    return f"{text}; rebuilding as {info.rebuilding}" if info.rebuilding else text
