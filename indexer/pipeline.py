"""Batch indexing: reader -> mapper (decode + embed) -> writer (index store), joined by a runner.

Decoding runs in worker threads (Pillow releases the GIL) one batch ahead of the forward
pass, so the model rarely waits for JPEGs. A file that cannot be decoded is skipped, counted
and reported; it never stops the run. Every written batch is durable, so a killed run loses
at most the batch in flight, and a re-run over the same output embeds only what changed: a
file held as it is stays (read and hashed), one held under another key gets that vector.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pictor.core.decode import check_pixels, load_image
from pictor.core.embedder import degenerate, degenerate_why
from pictor.core.files import content_hash
from pictor.core.gallery import GalleryEntry
from pictor.core.store import IndexStore, Item
from pictor.errors import InvalidImageError, InvalidRequestError, NotFoundError, ResourceExhaustedError
from pictor.image_files import check_key_text, path_text, read_image_file
from pictor.iterators import batched

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder
    from pictor.core.whitening import PCAWhitening

log = logging.getLogger(__name__)

WHITENING_SEED = 0  # which gallery images fit the whitening: reproducible runs


@dataclass
class IndexSummary:
    """What a run did; printed as JSON by ``pictor index --json``."""

    indexed: int = 0
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0  # files the index held already with this content, label and attributes
    skipped: int = 0
    # Of those indexed, files whose content the index held (under another key, or under this
    # one with another label or attributes): vector copied, not embedded.
    copied: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    whitening_seconds: float | None = None  # the PCA-whitening fit before it (a new whitened index)
    failures: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"}
    interrupted: bool = False  # Ctrl-C or SIGTERM: the batches written before it are kept
    stopped: str = ""  # why a write was refused (a full disk): the batches written before it are kept
    pruned: int = 0  # items deleted because the gallery no longer lists them (--prune)
    not_listed: int = 0  # items kept whose keys the gallery does not list (a complete run without --prune)
    # Files a folder holds that are not named as images (.heic, .txt), by suffix: never read.
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every listed file was written, skipped or found unchanged (so --prune may delete)."""
        return not (self.interrupted or self.stopped)

    @property
    def embedded(self) -> int:
        return self.indexed - self.copied

    def add_failures(self, failures: Iterable[tuple[GalleryEntry, str]]) -> None:
        for entry, error in failures:
            log.debug("skipped %s", error)  # the summary lists them; -v shows them as they come
            self.failures.append({"path": path_text(entry.path), "error": path_text(error)})
            self.skipped += 1


def split_misnamed(entries: Iterable[GalleryEntry]) -> tuple[list[GalleryEntry], list[tuple[GalleryEntry, str]]]:
    """Entries whose key can be stored, and those skipped with why: a file name that is not
    UTF-8 (from an old archive, say) cannot be a key, which is text."""
    good, bad = [], []
    for e in entries:
        try:
            check_key_text(e.key)
            good.append(e)
        except InvalidRequestError as err:
            bad.append((e, str(err)))
    return good, bad


@dataclass(frozen=True)
class DecodedBatch:
    entries: list[GalleryEntry]
    tensors: list[torch.Tensor]  # preprocessed, ready to stack
    hashes: list[str]  # content hash of each entry's file
    failures: list[tuple[GalleryEntry, str]]
    unchanged: int = 0  # files the store holds as they are: read and hashed, not decoded
    # Files whose content the store holds under another key (a renamed folder, another spelling
    # of the path, a duplicate) or under this one with another label or attributes:
    # (entry, content hash, the stored vector), not decoded.
    copies: list[tuple[GalleryEntry, str, np.ndarray]] = field(default_factory=list)

    def items(self) -> list[Item]:
        return [as_item(e, h) for e, h in zip(self.entries, self.hashes, strict=True)]


def as_item(entry: GalleryEntry, content_hash: str) -> Item:
    return Item(key=entry.key, label=entry.label, attributes=dict(entry.attributes), content_hash=content_hash)


def decode_batch(
    pool: ThreadPoolExecutor, entries: Sequence[GalleryEntry], embedder: Embedder, *, max_pixels: int,
    store: IndexStore | None = None,
) -> DecodedBatch:
    """Decode and preprocess a batch in the pool; failures are returned, not raised. An entry
    whose item ``store`` holds with the same content, label and attributes is left out; one
    whose content it holds under another key gets that item's vector."""
    stored = {} if store is None else {it.key: it for it in store.get([e.key for e in entries]).items}

    def load(entry: GalleryEntry) -> tuple[str, torch.Tensor | np.ndarray | None]:
        data = read_image_file(entry.path)
        digest = content_hash(data)
        if stored.get(entry.key) == as_item(entry, digest):
            return digest, None
        if store is not None and (vector := store.vector_of_content(digest)) is not None:
            try:  # the cap holds as for a decode (the vector may come from a run with another)
                check_pixels(data, max_pixels=max_pixels, draft_size=embedder.draft_size)
            except InvalidImageError as e:
                raise InvalidImageError(f"{entry.path}: {e}") from e
            return digest, vector
        image = load_image(entry.path, max_pixels=max_pixels, draft_size=embedder.draft_size, data=data)
        return digest, embedder.preprocess(image)

    def kept(entry: GalleryEntry) -> str:  # a file that went bad since it was indexed
        return "; the index keeps its earlier item" if entry.key in stored else ""

    futures = [pool.submit(load, e) for e in entries]
    ok, tensors, hashes, failed, unchanged, copies = [], [], [], [], 0, []
    for entry, fut in zip(entries, futures, strict=True):
        try:
            digest, tensor = fut.result()
            if tensor is None:
                unchanged += 1
                continue
            if isinstance(tensor, np.ndarray):
                copies.append((entry, digest, tensor))
                continue
            tensors.append(tensor)
            hashes.append(digest)
            ok.append(entry)
        except (InvalidImageError, NotFoundError, OSError) as e:
            # (A system error while decoding, out of file descriptors say, does not name the file.)
            said = str(e) if str(entry.path) in str(e) else f"{entry.path}: {e}"
            failed.append((entry, said + kept(entry)))
        except Exception as e:  # a bug or a decoder's surprise costs one file, never the run
            log.exception("unexpected error on %s", entry.path)
            failed.append((entry, f"{entry.path}: unexpected {type(e).__name__}: {e}{kept(entry)}"))
    return DecodedBatch(ok, tensors, hashes, failed, unchanged, copies)


def decoded_batches(
    batches: Iterable[list[GalleryEntry]], pool: ThreadPoolExecutor, embedder: Embedder, *, max_pixels: int,
    store: IndexStore | None = None,
) -> Iterator[DecodedBatch]:
    """Decode batch i+1 in the background while the caller embeds batch i; files ``store``
    holds unchanged are left out."""

    def decode(batch: list[GalleryEntry]) -> DecodedBatch:
        return decode_batch(pool, batch, embedder, max_pixels=max_pixels, store=store)

    pending: Future[DecodedBatch] | None = None
    # One extra thread drives the prefetch so the decode workers stay busy.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pictor-prefetch") as driver:
        for batch in batches:
            nxt = driver.submit(decode, batch)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def embedded_batches(
    entries: Iterable[GalleryEntry], embedder: Embedder, *, batch_size: int, workers: int, max_pixels: int,
    store: IndexStore | None = None,
) -> Generator[tuple[DecodedBatch, np.ndarray], None, None]:
    """Each decoded batch with the embeddings of its good entries ([0, dim] when none); with
    ``store``, files it holds unchanged are not embedded again."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pictor-decode") as pool:
        for decoded in decoded_batches(batched(entries, batch_size), pool, embedder, max_pixels=max_pixels,
                                       store=store):
            if decoded.tensors:
                yield without_degenerate(decoded, embedder.forward_batch(torch.stack(decoded.tensors)).embeddings,
                                         embedder.precision)
            else:
                yield decoded, np.zeros((0, embedder.spec.dim), np.float32)


def without_degenerate(decoded: DecodedBatch, vectors: np.ndarray, precision: str
                       ) -> tuple[DecodedBatch, np.ndarray]:
    """Move entries whose embedding is ``degenerate`` to the failures: one file, not the run."""
    good = ~degenerate(vectors)
    if good.all():
        return decoded, vectors
    why = degenerate_why(precision)
    failed = [(e, f"{e.path}: {why}") for e, g in zip(decoded.entries, good, strict=True) if not g]
    kept = np.flatnonzero(good)
    return replace(decoded, entries=[decoded.entries[i] for i in kept],
                   tensors=[decoded.tensors[i] for i in kept], hashes=[decoded.hashes[i] for i in kept],
                   failures=decoded.failures + failed), vectors[good]


def indexed_under_other_keys(entries: Sequence[GalleryEntry], store: IndexStore, source: str | os.PathLike[str]
                             ) -> dict[str, str]:
    """Entries whose file ``store`` holds under another spelling of its path only, new key ->
    key in the store: absolute, relative to the current folder, to the gallery's folder (a
    manifest's, whose paths are relative to it) or to the folder above (``g/a.jpg``, indexed from
    beside ``g``, now ``/home/me/g/a.jpg``). Indexing them would add second copies, since a key is
    the path as given."""
    base = Path(os.path.abspath(source if os.path.isdir(source) else os.path.dirname(source) or "."))
    bases = (base, base.parent)
    found: dict[str, str] = {}
    for chunk in batched(entries, 4096):  # a few spellings per entry, a chunk's at a time
        held = store.keys_present([e.key for e in chunk])
        spellings: dict[str, str] = {}
        for e in chunk:
            if e.key in held:  # its own key is there: replaced or left, not added
                continue
            absolute = Path(os.path.abspath(e.path))
            alts = {absolute.as_posix(), Path(os.path.relpath(absolute)).as_posix(),
                    *(absolute.relative_to(b).as_posix() for b in bases if absolute.is_relative_to(b))}
            spellings.update((alt, e.key) for alt in alts if alt != e.key)
        found.update((spellings[k], k) for k in store.keys_present(list(spellings)))
    return found


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them to the handlers they
    had (Ctrl-C's raises ``KeyboardInterrupt``, and so does `pictor index`'s for SIGTERM).

    An interrupt between a batch's commit and the summary's count would leave a durable batch
    uncounted (or the store's in-memory index behind its database). Signals reach only the
    main thread, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


class _Every:
    """The clock of progress lines: one is due every ``seconds`` (never when 0)."""

    def __init__(self, seconds: float) -> None:
        self._start = time.perf_counter()
        self._seconds = seconds
        self._next = self._start + seconds if seconds > 0 else float("inf")

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def due(self) -> float | None:
        """The seconds since the start when a line is due, else None."""
        if (now := time.perf_counter()) < self._next:
            return None
        self._next = now + self._seconds
        return now - self._start


def run_indexing(
    entries: Iterable[GalleryEntry],
    embedder: Embedder,
    store: IndexStore,
    *,
    whitening: PCAWhitening | None = None,
    batch_size: int = 32,
    workers: int = 2,
    max_pixels: int,
    total: int | None = None,
    progress: bool = True,
    log_every: float = 0.0,
) -> IndexSummary:
    """Embed every entry (whitened when the index is) and upsert it into ``store``; bad files
    are skipped and reported. Ctrl-C, or a write the store refuses (a full disk), ends the run
    early with the summary of what was written.

    ``progress`` draws a bar (for a terminal); ``log_every`` > 0 logs a progress line that often
    (seconds) instead, for logs that a bar would fill with carriage returns (docker, nohup)."""
    from tqdm import tqdm

    summary = IndexSummary()
    clock = _Every(log_every)
    bar = tqdm(total=total, unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
    batches = embedded_batches(entries, embedder, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                               store=store)
    try:
        for decoded, vectors in batches:
            summary.add_failures(decoded.failures)
            with interrupts_deferred():  # a batch written is a batch counted
                parts = [vectors if whitening is None else whitening.apply(vectors)] if decoded.entries else []
                if decoded.copies:  # stored vectors: in the index's space (whitened) already
                    parts.append(np.stack([v for *_, v in decoded.copies]))
                if parts:  # one transaction for the batch
                    result = store.upsert(decoded.items() + [as_item(e, h) for e, h, _ in decoded.copies],
                                          np.concatenate(parts))
                    summary.inserted += result.inserted
                    summary.replaced += result.replaced
                summary.copied += len(decoded.copies)
                summary.indexed += len(decoded.entries) + len(decoded.copies)
                summary.unchanged += decoded.unchanged
            bar.update(len(decoded.entries) + len(decoded.copies) + len(decoded.failures) + decoded.unchanged)
            bar.set_postfix(skipped=summary.skipped, refresh=False)
            if (elapsed := clock.due()) is not None:
                done = summary.indexed + summary.unchanged + summary.skipped  # as the bar counts
                log.info("%d of %s files done: %d embedded (%.1f img/s), %d unchanged, %d skipped", done,
                         total if total is not None else "?", summary.embedded, summary.embedded / elapsed,
                         summary.unchanged, summary.skipped)
    except KeyboardInterrupt:  # an upsert is all or nothing, so the counts are what was written
        summary.interrupted = True
    except ResourceExhaustedError as e:  # a full disk: each batch after it would fail the same way
        summary.stopped = str(e)
    finally:
        batches.close()  # stops the decoding workers
        bar.close()
    summary.seconds = round(clock.elapsed(), 3)
    summary.images_per_second = round(summary.embedded / summary.seconds, 2) if summary.seconds else 0.0
    return summary


def fit_whitening(
    entries: Sequence[GalleryEntry],
    embedder: Embedder,
    out_dim: int,
    *,
    sample: int,
    batch_size: int = 32,
    workers: int = 2,
    max_pixels: int,
    progress: bool = True,
    log_every: float = 0.0,
) -> PCAWhitening:
    """PCA-whitening to ``out_dim`` fitted on a seeded random sample of ``entries``; ``progress``
    and ``log_every`` as for :func:`run_indexing`.

    A random sample, not the first images: a sorted listing starts with the first classes only.
    Nothing is written before the fit, so an interrupted one is lost (its note says so).
    """
    from tqdm import tqdm

    from pictor.core.whitening import PCAWhitening

    if not 0 < out_dim <= embedder.spec.dim:
        raise InvalidRequestError(
            f"--pca-whiten must be between 1 and the embedding dim {embedder.spec.dim}, got {out_dim}")
    chosen = random.Random(WHITENING_SEED).sample(list(entries), min(sample, len(entries)))
    bar = tqdm(total=len(chosen), unit="img", desc="whitening sample", disable=not progress, dynamic_ncols=True)
    clock = _Every(log_every)
    parts, failures, done = [], [], 0
    batches = embedded_batches(chosen, embedder, batch_size=batch_size, workers=workers, max_pixels=max_pixels)
    try:
        for decoded, vectors in batches:
            parts.append(vectors)
            failures += decoded.failures
            done += len(decoded.entries) + len(decoded.failures)
            bar.update(len(decoded.entries) + len(decoded.failures))
            if (elapsed := clock.due()) is not None:
                log.info("whitening sample: %d of %d images done: %d embedded (%.1f img/s), %d skipped", done,
                         len(chosen), done - len(failures), (done - len(failures)) / elapsed, len(failures))
    except KeyboardInterrupt as e:
        e.add_note(f"while fitting the PCA-whitening ({done} of its {len(chosen)} sample images done); "
                   "nothing is written before the fit ends, so the next run starts it over")
        raise
    finally:
        batches.close()  # stops the decoding workers
        bar.close()
    x = np.concatenate(parts) if parts else np.zeros((0, embedder.spec.dim), np.float32)
    if len(x) <= out_dim:  # fewer images than dims: the covariance has too low a rank
        unreadable = (f" ({len(failures)} of the {len(chosen)} sampled could not be used, e.g. "
                      f"{failures[0][1]})" if failures else "")
        more = "raise --pca-sample" if len(chosen) < len(entries) else "add images"
        raise InvalidRequestError(
            f"PCA-whitening to {out_dim} dims needs more than {out_dim} usable images in its sample, got "
            f"{len(x)}{unreadable}; lower --pca-whiten or {more}")
    whitening = PCAWhitening.fit(x, out_dim)
    log.info("fitted PCA-whitening %s on %d gallery images", whitening.fingerprint, len(x))
    return whitening
