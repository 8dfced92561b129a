"""``pictor index``: embed a gallery into an index directory that ``pictor serve`` opens."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pictor.config import (
    DEFAULT_BACKBONE,
    MAX_DECODE_WORKERS,
    IndexerSettings,
    add_flag,
    build_settings,
    set_by,
    show_progress,
    whole_number,
)
from pictor.errors import IncompatibleModelError, InvalidRequestError, require_server_extra
from pictor.image_files import one_line, path_text

PROGRESS_LOG_SECONDS = 30.0  # how often a run whose stderr is not a terminal logs its progress

if TYPE_CHECKING:
    from pictor.core.embedder import Embedder
    from pictor.core.gallery import GalleryEntry
    from pictor.core.spec import ModelSpec
    from pictor.core.store import IndexStore
    from pictor.core.whitening import PCAWhitening
    from pictor.indexer.pipeline import IndexSummary

HELP = """\
Embed every image of GALLERY with a pretrained CNN and write a searchable index to --out.

GALLERY is a folder (searched recursively, linked folders included; hidden files and folders,
named with a leading dot, left out; each image's label is the top-level folder it is in) or a UTF-8 CSV/JSONL manifest with a `path` column (relative to the
manifest's folder) and optional `label`, `key` and attribute columns (JSON null = absent; CSV
cells are trimmed of surrounding spaces, as JSONL labels are; other JSONL values are strings or
numbers, a number kept as written: 1.50 stays "1.50").
Each item's key is its `key`, else the file's path as given (./a//b.jpg becomes a/b.jpg), so
give a folder the same way each time (photos/ and /home/me/photos/ are different keys); a
manifest that repeats a key is refused, since which row should win is a guess, as is one with
a row the index cannot hold (a key or label over 4,096 characters, a NUL in a label, attributes
over 65,536 characters as JSON), before anything is written. Running again over an existing
index (with the index's own model) adds new keys and replaces items whose file content, label or
attributes changed; files the index holds as they are (same key, content by sha256, label and
attributes) are read and hashed, not embedded again, and a file whose content the index holds
under another key (a renamed folder, a duplicate) gets a copy of that vector.

--prune makes the index mirror GALLERY: after a complete run it deletes the items whose keys
GALLERY no longer lists (files deleted or renamed since an earlier run, and items another
gallery or `pictor add` put there). A listed file that cannot be decoded keeps its earlier item,
and so do the items under a folder that cannot be listed (reported as skipped). Without
--prune, the summary counts the items it would delete.

Files that cannot be decoded (or whose names are not UTF-8) are skipped and listed; the run
goes on. Files in a folder not named as images (.heic, .txt, ...) are not read: a warning
counts them (`left_out` in --json), and --strict does not. Each batch is durable once
written, so an interrupted run (Ctrl-C, SIGTERM, kill -9) keeps what it wrote. Exit status: 0 done (skipped files are listed), 1 some files skipped and
--strict given, 2 unusable input (none of the files readable included) or a write the disk
refused (full: what was written is kept), 130 interrupted.

The default backbone, efficientnet_lite0, ships ImageNet weights offline; `pictor models`
lists the others. Runs on the GPU when there is one (--device).

--pca-whiten DIM fits PCA-whitening on a random sample of the gallery (--pca-sample images,
embedded once more for the fit) and stores it with the new index, which then holds DIM-d
whitened vectors; the server whitens queries the same way. A re-run reuses it. The fit comes
first and is kept with the index's first images: a run into a new --out folder interrupted
before those are written keeps nothing, and the next run fits again (into a folder that was
there, the fit stays with an empty index, and the next run reuses it).

examples:
  pictor index sample/gallery --out index
  pictor index sample/gallery --out index-w --pca-whiten 128
  pictor index photos.csv --out index --backbone resnet50 --index-type HNSW32 --json
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "index", help="embed a folder or manifest of images into an index",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("gallery", metavar="GALLERY", nargs="?",
                   help="image folder, or .csv/.jsonl manifest (or `gallery` in the config file, PICTOR_GALLERY)")
    p.add_argument("--out", help="index directory to create or update (default ./index)")
    add_flag(p, "backbone")
    add_flag(p, "weights")
    p.add_argument("--model", dest="model_file", help="model file from `pictor train`: embed with its (fine-tuned) backbone")
    p.add_argument("--index-type",
                   help="auto (default): exact (Flat) below 100,000 items, above that an IVF over "
                        "PCA-reduced 8-bit codes re-ranked on the full vectors (HNSW32 for vectors of "
                        "256 dims or fewer that fit the memory budget; rebuilt as the collection grows), tuned to recall@10 0.95; "
                        "or a FAISS factory "
                        "string of the families the index supports (the error lists them): Flat, HNSW32, "
                        "IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ32, OPQ32,IVF1024,PQ32, "
                        "PCA256,IVF1024,PQ64x4fs,Refine(SQfp16) (a type "
                        "that needs training searches exactly until the index holds 39 items per IVF "
                        "list or PQ code, e.g. 39,936 for IVF1024; `pictor info` shows it as \"(Flat)\")")
    p.add_argument("--pca-whiten", type=whole_number, metavar="DIM",
                   help="PCA-whiten embeddings to DIM dims, fitted on a gallery sample and stored with "
                   "the index (off by default; new index only)")
    p.add_argument("--pca-sample", type=whole_number, metavar="N",
                   help="gallery images that fit the whitening (default 10000)")
    p.add_argument("--labels", choices=("folder", "none"),
                   help="folder (default): label = top-level folder name (a manifest: its own labels); none: no labels")
    add_flag(p, "batch_size")
    p.add_argument("--workers", type=whole_number, help=f"decoding threads (default 2, at most {MAX_DECODE_WORKERS})")
    add_flag(p, "max_pixels", help_end="larger files are skipped and listed")
    add_flag(p, "device")
    add_flag(p, "pooling", help_end="an index keeps its own, and serve follows it")
    add_flag(p, "precision")
    add_flag(p, "compile")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout (counts, skipped files, the index's size, backbone and dim)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file was skipped")
    p.add_argument("--prune", action="store_true",
                   help="after a complete run, delete the items GALLERY no longer lists (see above)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in logs, every "
                        f"{PROGRESS_LOG_SECONDS:.0f} s)")
    add_flag(p, "config")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_server_extra("pictor index")
    from pictor.core.gallery import GalleryEntry

    settings = build_settings(IndexerSettings, vars(args), config_file=args.config)
    entries, misnamed, unlisted, left_out = _read_entries(settings)
    out = Path(settings.out)
    progress = show_progress(args.no_progress)
    # Without a terminal for a bar (docker, nohup), progress lines instead, unless turned off.
    log_every = 0.0 if progress or args.no_progress else PROGRESS_LOG_SECONDS
    target = _open_target(settings, out, entries, progress, log_every)
    if target.opened:
        _warn_indexed_twice(entries, target.store, settings.gallery)
    space = {"backbone": target.embedder.spec.backbone, "dim": target.store.dim}  # (for --json; _index closes the store)
    summary, count = _index(args, settings, target, entries, unlisted, progress, log_every)
    summary.whitening_seconds = target.whitening_seconds
    summary.add_failures(misnamed)
    summary.add_failures((GalleryEntry(key=folder.as_posix(), path=folder),
                          f"{folder}: cannot list the folder ({why}); its images were left out"
                          + (" and their items kept" if args.prune else ""))
                         for folder, why in unlisted)
    summary.left_out = dict(left_out.most_common())
    discard = target.created and count == 0  # an empty index this run made would only be in the way
    _print_summary(args, summary, out, count, discard, space)
    return _exit_code(args, summary, out, discard, settings.gallery)


@dataclasses.dataclass
class _Target:
    """The index a run writes to and the model that embeds for it."""

    store: IndexStore
    embedder: Embedder
    whitening: PCAWhitening | None
    opened: bool  # an existing index; else this run made it
    created: bool  # this run made its folder too
    whitening_seconds: float | None = None  # how long this run's whitening fit took


def _read_entries(settings: IndexerSettings) -> tuple[
        list[GalleryEntry], list[tuple[GalleryEntry, str]], list[tuple[Path, str]], Counter[str]]:
    """The gallery's images, those whose names cannot be keys (misnamed, with why), the
    folders that could not be listed (with why: their images are unknown), and the files left
    out as not named as images (by suffix)."""
    from pictor.core.gallery import image_suffixes_text, read_gallery
    from pictor.indexer.pipeline import split_misnamed

    if not settings.gallery:
        raise InvalidRequestError("no gallery: give GALLERY (an image folder or a manifest), or `gallery` "
                                  "in the config file, or PICTOR_GALLERY")
    unlisted: list[tuple[Path, str]] = []
    left_out: Counter[str] = Counter()
    entries, misnamed = split_misnamed(read_gallery(settings.gallery, labels=settings.labels, unlisted=unlisted,
                                                    passed_over=left_out))
    if not entries and not misnamed and not unlisted:
        raise InvalidRequestError(f"no images found in {settings.gallery} (looked for {image_suffixes_text()})")
    if settings.labels == "folder":
        if Path(settings.gallery).is_file():
            _warn_unlabelled_manifest(settings.gallery, entries)
        else:
            _warn_classless(settings.gallery, [*entries, *(e for e, _ in misnamed)], unlisted)
    return entries, misnamed, unlisted, left_out


def _warn_unlabelled_manifest(manifest: str, entries: list[GalleryEntry]) -> None:
    """A manifest with no label at all, unless --labels none says it is meant: a misspelt label
    column ('lable') became an attribute, and the index is left without classes."""
    if entries and not any(e.label for e in entries):
        fields = sorted({name for e in entries for name in e.attributes})
        others = f" (its other fields, kept as attributes: {', '.join(fields)})" if fields else ""
        print(f"warning: manifest {manifest} gives no image a label{others}: the items are indexed unlabelled, "
              "so Classify's kNN vote and --label filters have nothing to go on; name the column 'label', "
              "or give --labels none if no labels are meant", file=sys.stderr)


def _warn_classless(gallery: str, entries: list[GalleryEntry], unlisted: list[tuple[Path, str]]) -> None:
    """Name the gallery's top-level folders with no image (unreadable ones are reported apart):
    a class meant for the kNN vote that will have no item, as `train` warns."""
    from pictor.core.gallery import classless_folders

    unreadable = {os.path.realpath(folder) for folder, _ in unlisted}
    if empty := [name for name in classless_folders(gallery, entries)
                 if os.path.realpath(Path(gallery) / name) not in unreadable]:
        print(one_line(f"warning: folders in {gallery} with no images, so no items with their label: "
                       f"{', '.join(empty)}"), file=sys.stderr)


def _remove_if_empty(folder: Path) -> None:
    # Not empty: a second run started on the same new --out at once made its index there.
    with contextlib.suppress(OSError):
        folder.rmdir()


def _open_target(settings: IndexerSettings, out: Path, entries: list[GalleryEntry], progress: bool,
                 log_every: float) -> _Target:
    """Open the index at ``out``, or make it (fitting its whitening first when asked), and load
    the model; every setting is checked before the slow steps it would waste."""
    from pictor.core.faiss_index import check_factory_form, check_new_factory
    from pictor.core.store import AUTO, MANIFEST, half_made_store, make_store_dir
    from pictor.core.whitening import create_index, index_spec, open_index
    from pictor.indexer.pipeline import fit_whitening

    if (out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir()))
            and not half_made_store(out)):  # (a creation cut off is made anew)
        raise InvalidRequestError(f"--out {out} exists and is not an index store; give a new or "
                                  "empty folder, or an index to add to")
    # An existing index is opened (and locked) first: a second run on it, or one on an index a
    # server holds, fails at once, not after loading a model.
    store, whitening, spec = open_index(out) if (out / MANIFEST).is_file() else (None, None, None)
    sample = min(len(entries), settings.pca_sample)
    if store is None and settings.pca_whiten and sample <= settings.pca_whiten:  # before the model loads
        raise InvalidRequestError(
            f"--pca-whiten {settings.pca_whiten} is fitted on the gallery's images and needs more of "
            f"them than dims: {sample} here (gallery {len(entries)}, --pca-sample "
            f"{settings.pca_sample}); give --pca-whiten below {sample} (less if some cannot be read), "
            "or leave it out")
    if store is None and settings.pca_whiten and sample < 2 * settings.pca_whiten:
        # Measured (docs/benchmarks.md, PCA-whitening): 256 dims fitted on 300 images lost 4 points
        # of recall@10 against no whitening; fitted on 2.3 times the dims or more, none.
        print(f"warning: --pca-whiten {settings.pca_whiten} fitted on {sample} images, under twice its dims: "
              "its smallest directions are noise, scaled up, and search gets worse than without "
              f"whitening; give {'more images (--pca-sample)' if sample < len(entries) else 'a larger gallery'}, "
              "fewer dims, or leave it out", file=sys.stderr)
    opened = store is not None  # else this run makes one
    whitening_seconds: float | None = None  # (a new index's fit)
    created = not opened and not out.exists()
    if not opened:
        make_store_dir(out)  # now, not after the model loaded and a whitening sample was embedded
    with contextlib.ExitStack() as on_error:  # interrupted, a bad setting, a full disk
        if store is not None:
            on_error.callback(store.close)
            _check_pca_whiten(store, whitening, settings)
            if settings.index_type not in (AUTO, store.index_type):
                raise InvalidRequestError(
                    f"index {out} is of type {store.index_type!r}; index type {settings.index_type} (from "
                    f"{set_by(settings, 'index_type')}) applies to a new index only: drop it, or build a new "
                    "index with another --out")
        else:
            if created:  # still empty (a store that failed to be made removed its files): no folder left behind
                on_error.callback(_remove_if_empty, out)
            if settings.index_type != AUTO:  # what can be checked before the model loads
                check_factory_form(settings.index_type)
        embedder = _embedder(settings, store, spec, out)
        if store is not None:
            from pictor.core.embedder import warn_mixed_precision

            store.check_spec(index_spec(embedder.spec, whitening), what="this run's model")
            warn_mixed_precision(out, store.precision, embedder.precision, "this run embeds")
        else:
            if settings.index_type != AUTO:  # a bad factory string: now, not after a whitening sample
                check_new_factory(settings.pca_whiten or embedder.spec.dim, settings.index_type)
            if settings.pca_whiten:
                fit_start = time.perf_counter()
                whitening = fit_whitening(
                    entries, embedder, settings.pca_whiten, sample=settings.pca_sample,
                    batch_size=settings.model.batch_size, workers=settings.workers,
                    max_pixels=settings.model.max_pixels, progress=progress, log_every=log_every)
                whitening_seconds = round(time.perf_counter() - fit_start, 3)
            store = create_index(out, embedder.spec, whitening, index_type=settings.index_type,
                                 precision=embedder.precision)
        on_error.pop_all()  # the store is open, for the run
    return _Target(store, embedder, whitening, opened, created, whitening_seconds)


def _warn_indexed_twice(entries: list[GalleryEntry], store: IndexStore, source: str) -> None:
    from pictor.indexer.pipeline import indexed_under_other_keys

    if twice := indexed_under_other_keys(entries, store, source):
        new, old = next(iter(twice.items()))
        print(f"warning: {len(twice)} of these files are in the index already under another key "
              f"({new!r} is there as {old!r}); they are added again as new items (their vectors copied "
              "where the file is unchanged). To replace them instead, give them the keys the index knows: name "
              "the folder as it was named then (relative or absolute), or put those keys in the "
              "manifest's key column", file=sys.stderr)


def _index(args: argparse.Namespace, settings: IndexerSettings, target: _Target, entries: list[GalleryEntry],
           unlisted: list[tuple[Path, str]], progress: bool, log_every: float) -> tuple[IndexSummary, int]:
    """Embed and write ``entries`` (then prune, when asked); the summary and the index's size.
    Closes the store."""
    from pictor.indexer.pipeline import interrupts_deferred, run_indexing

    store = target.store
    summary: IndexSummary | None = None
    count: int | None = None
    try:
        with store, store.bulk():  # re-train the index once at the end, not at every growth step
            summary = run_indexing(
                entries, target.embedder, store, whitening=target.whitening,
                batch_size=settings.model.batch_size, workers=settings.workers,
                max_pixels=settings.model.max_pixels, total=len(entries), progress=progress,
                log_every=log_every,
            )
            with interrupts_deferred():  # a prune's delete is committed and applied in one piece
                if args.prune and summary.complete:
                    # Not listed is not gone when the folder could not be listed: those items stay.
                    unknown = tuple(folder.as_posix() + "/" for folder, _ in unlisted)
                    gone = [key for key in store.keys_absent_from(e.key for e in entries)
                            if not key.startswith(unknown)]
                    summary.pruned = store.delete(gone).deleted if gone else 0
                elif summary.complete and not unlisted:
                    # Said, so that an index larger than the gallery is not a puzzle: lookups of the
                    # listed keys, not a scan of the whole index.
                    summary.not_listed = len(store) - len(store.keys_present([e.key for e in entries]))
                count = len(store)
    except KeyboardInterrupt:
        if summary is None or count is None:
            raise
        # In the index's final re-training (minutes at scale) or its snapshot: what was written
        # stays, and the summary says so; the next open re-trains.
        summary.interrupted = True
    assert summary is not None and count is not None
    return summary, count


def _print_summary(args: argparse.Namespace, summary: IndexSummary, out: Path, count: int, discard: bool,
                   space: dict[str, object]) -> None:
    if args.json:
        json.dump({**dataclasses.asdict(summary), "index": path_text(out), "index_size": count, **space},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if not discard:  # else _exit_code says that no index was written
            done = ("indexed" if summary.complete else  # (a cut-off run must not read as a finished one)
                    f"{'interrupted' if summary.interrupted else 'stopped'} after indexing")
            print(f"{done} {summary.indexed} image{'' if summary.indexed == 1 else 's'} ({summary.inserted} new, "
                  f"{summary.replaced} replaced) into {out} in {summary.seconds:.1f}s"
                  + (f" after a {summary.whitening_seconds:.1f}s PCA-whitening fit"
                     if summary.whitening_seconds is not None else "")
                  + (f" ({summary.images_per_second:.1f} img/s embedded)" if summary.embedded else "")
                  + (f"; {summary.copied} of them not embedded again (the index held a vector of the same "
                     "file)" if summary.copied else "")
                  + (f"; {summary.unchanged} unchanged, left as they were" if summary.unchanged else "")
                  + f"; index holds {count} item{'' if count == 1 else 's'}"
                  + (f" ({summary.not_listed} not in this gallery; --prune would delete "
                     f"{'it' if summary.not_listed == 1 else 'them'})" if summary.not_listed
                     else "")
                  + f"; skipped {summary.skipped}"
                  + (("; not pruned (only a complete run prunes)" if not summary.complete
                      else f"; pruned {summary.pruned} no longer listed") if args.prune else ""))
        for failure in summary.failures:
            print(f"  skipped {one_line(failure['error'])}", file=sys.stderr)


def _exit_code(args: argparse.Namespace, summary: IndexSummary, out: Path, discard: bool, gallery: str) -> int:
    """The run's exit status, saying why on stderr; an index this run made and left empty is removed."""
    if not summary.complete:  # interrupted, or a write refused (a full disk): what was written stays
        why = "interrupted" if summary.interrupted else f"stopped: {summary.stopped}"
        if discard:
            shutil.rmtree(out)
            why += " before any image was indexed" if summary.interrupted else ""
            kept = "; no index was written" + (" (and its PCA-whitening fit is lost: the next run fits it again)"
                                               if summary.whitening_seconds is not None else "")
        else:
            kept = (f"; the {summary.indexed} images indexed before it are kept. Run the same command again "
                    "to index the rest (the files written are not embedded again)")
        print(f"pictor index: {why}{kept}", file=sys.stderr)
        return 130 if summary.interrupted else 2
    if summary.skipped and not (summary.indexed or summary.unchanged):
        from pictor.core.gallery import relative_paths_hint

        if discard:
            shutil.rmtree(out)
        print(f"pictor index: nothing could be indexed ({summary.skipped} skipped, listed above)"
              + ("; no index was written" if discard else "") + relative_paths_hint(gallery), file=sys.stderr)
        return 2
    return 1 if summary.skipped and args.strict else 0


def _check_pca_whiten(store: IndexStore, whitening: PCAWhitening | None, settings: IndexerSettings) -> None:
    """Refuse a --pca-whiten that an existing index was not built with."""
    if settings.pca_whiten and settings.pca_whiten != (whitening.out_dim if whitening else 0):
        raise InvalidRequestError(
            f"index {store.path} was built with {store.spec.whitening or 'no whitening'}; "
            f"pca_whiten {settings.pca_whiten} (from {set_by(settings, 'pca_whiten')}) would change its "
            "space: drop it to keep the index's own, or build a new index with another --out"
        )


def _embedder(settings: IndexerSettings, store: IndexStore | None, spec: ModelSpec | None,
              out: Path) -> Embedder:
    """The run's model: --model's, else an existing index's own, else the settings'."""
    m = settings.model
    if store is not None and spec is not None and not settings.model_file:
        if wrong := m.disagreement(spec.backbone, spec.pooling):
            raise IncompatibleModelError(
                f"index {out} holds embeddings of {spec.describe()}; this run asks for {wrong}. "
                "Leave those settings out to add to the index with its own model, or build a new "
                "index with another --out")
        from pictor.core.embedder import embedder_for_index, kept_precision

        return embedder_for_index(spec, out, weights=m.weights, device=m.device, compile=m.compile,
                                  precision=kept_precision(m.precision, store.precision, m.device))
    if settings.model_file:
        from pictor.core.head import load_model

        model = load_model(settings.model_file)
        if wrong := m.disagreement(model.spec.backbone, model.spec.pooling):
            raise InvalidRequestError(
                f"{wrong} disagree{'s' if ' and ' not in wrong else ''} with the model file "
                f"{settings.model_file} ({model.spec.describe()}), whose backbone embeds; drop one of them")
        return model.create_embedder(device=m.device, precision=m.precision, compile=m.compile,
                                     weights=m.weights or None)
    from pictor.core.embedder import create_embedder

    return create_embedder(
        m.backbone or DEFAULT_BACKBONE, weights=m.weights or None, device=m.device, precision=m.precision,
        pooling=m.pooling or "avg", compile=m.compile,
    )
