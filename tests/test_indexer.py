"""`pictor index`: embeds a gallery, skips and reports bad files, re-runs without duplicates."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import drawn_image, pictor, unlistable
from PIL import Image

from pictor.cli import main
from pictor.config import ServerSettings
from pictor.core.gallery import GalleryEntry
from pictor.core.store import IndexStore, Item
from pictor.core.whitening import WHITENING_FILE
from pictor.errors import IncompatibleModelError, InvalidRequestError
from pictor.indexer.pipeline import DecodedBatch, without_degenerate
from pictor.server.engine import Engine


def test_index_reports_bad_files_and_keeps_going(gallery: Path, tmp_path: Path) -> None:
    (gallery / "cool" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (gallery / "cool" / "empty.png").write_bytes(b"")
    os.mkfifo(gallery / "cool" / "pipe.jpg")  # reading it would block the run forever
    # 140 bytes that a naive resize would blow up to 4 GB: indexed, within bounded memory.
    Image.new("RGB", (20000, 1), (200, 30, 30)).save(gallery / "warm" / "strip.png")
    # A Latin-1 name from an old archive: not text, so it cannot be a key.
    with open(os.fsencode(gallery / "cool") + b"/caf\xe9.png", "wb") as f:
        f.write(drawn_image(5))
    out = tmp_path / "index"
    r = pictor("index", str(gallery), "--out", str(out), "--json", "--batch-size", "5")
    summary = json.loads(r.stdout)
    assert (summary["indexed"], summary["skipped"], summary["index_size"]) == (13, 4, 13)
    assert (summary["backbone"], summary["dim"]) == ("efficientnet_lite0", 1280)  # what was indexed with
    assert {Path(f["path"]).name for f in summary["failures"]} == {
        "broken.jpg", "empty.png", "pipe.jpg", "caf\\xe9.png"}  # valid text: strict JSON parsers refuse \udce9
    assert any("is not UTF-8 text" in f["error"] for f in summary["failures"])
    assert all(f["error"] for f in summary["failures"])
    assert "faiss.loader" not in r.stderr  # no alarming library-probe lines by default

    strict = pictor("index", str(gallery), "--out", str(out), "--strict", check=False)
    assert strict.returncode == 1

    with IndexStore.open(out) as store:
        assert len(store) == 13
        query = store.get_vector(sorted(gallery.rglob("img*.png"))[0].as_posix())
        labels = {h.label for h in store.search(query[None], 12)[0]}
        assert labels == {"warm", "cool"}


def test_rerun_replaces_instead_of_duplicating(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out))
    (gallery / "warm" / "extra.png").write_bytes(drawn_image(99))
    changed = gallery / "cool" / "img00.png"
    changed.write_bytes(drawn_image(98))
    summary = json.loads(pictor("index", str(gallery), "--out", str(out), "--json").stdout)
    # Only the new and the changed file are embedded; the others are read, hashed and left.
    assert (summary["inserted"], summary["replaced"], summary["unchanged"], summary["index_size"]) == (1, 1, 11, 13)
    with IndexStore.open(out) as store:
        assert store.search(store.get_vector(changed.as_posix())[None], 1)[0][0].key == changed.as_posix()
    # The same files named another way are other keys: added again, with a warning that says so.
    relative = pictor("index", gallery.name, "--out", str(out), cwd=gallery.parent)
    assert "13 of these files are in the index already under another key" in relative.stderr
    # ... with the vectors of the same content copied, not embedded again.
    assert "indexed 13 images (13 new, 0 replaced)" in relative.stdout
    assert "13 of them not embedded again (the index held a vector of the same file)" in relative.stdout
    again = pictor("index", gallery.name, "--out", str(out), cwd=gallery.parent)  # both spellings held now
    assert "under another key" not in again.stderr and "13 unchanged" in again.stdout
    # The other spelling's 13 items are kept, and counted.
    assert "index holds 26 items (13 not in this gallery; --prune would delete them)" in again.stdout
    # A copy obeys the pixel cap as a decode would (the stored vector came from a run without it).
    (tmp_path / "alias").symlink_to(gallery)
    capped = json.loads(pictor("index", "alias", "--out", str(out), "--max-pixels", "100", "--json",
                               check=False, cwd=tmp_path).stdout)
    assert (capped["copied"], capped["skipped"]) == (0, 13)
    assert all("too large" in f["error"] for f in capped["failures"])
    with IndexStore.open(out) as store:
        got = store.get([changed.as_posix(), f"{gallery.name}/cool/img00.png"], vectors=True)
        assert got.vectors is not None and np.array_equal(got.vectors[0], got.vectors[1])
    # --prune mirrors the gallery as named now: the other spelling's 13 items go, and so does
    # the item of a file deleted since.
    (gallery / "warm" / "extra.png").unlink()
    pruned = json.loads(pictor("index", str(gallery), "--out", str(out), "--prune", "--json").stdout)
    assert (pruned["replaced"], pruned["unchanged"], pruned["pruned"], pruned["index_size"]) == (0, 12, 14, 12)
    # A label that changed (a manifest's row) re-writes the item.
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{'new' if p == changed else ''}\n"
                                                  for p in sorted(gallery.rglob("*.png"))))
    relabelled = json.loads(pictor("index", str(manifest), "--out", str(out), "--json").stdout)
    assert (relabelled["replaced"], relabelled["inserted"]) == (12, 0)  # label "" from the folder's


def test_an_image_added_through_the_server_is_not_embedded_again(gallery: Path, built_index: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    image = sorted(gallery.rglob("*.png"))[0]
    engine = Engine.load(ServerSettings(index=str(built_index), device="cpu"))
    assert engine.embedder.precision == engine.store.precision  # "auto": as the index was made
    assert "holds vectors embedded at" not in caplog.text
    try:  # as `pictor add` sends it: the file's bytes under its path as key
        engine.upsert([Item(key=image.as_posix(), label=image.parent.name)], [image.read_bytes()], [None])
        engine.upsert([Item(key="vector-only")], [None], [np.ones(engine.store.spec.dim).tolist()])
    finally:
        engine.close()
    summary = json.loads(pictor("index", str(gallery), "--out", str(built_index), "--json").stdout)
    assert (summary["unchanged"], summary["indexed"], summary["index_size"]) == (12, 0, 13)
    with IndexStore.open(built_index) as store:
        made_at = store.precision
    other = "fp32" if made_at == "bf16" else "bf16"
    Engine.load(ServerSettings(index=str(built_index), device="cpu", precision=other)).close()
    assert f"holds vectors embedded at {made_at}; queries and added images are embedded at {other}" in caplog.text


def test_ctrl_c_ends_the_run_with_what_was_written(gallery: Path, tmp_path: Path, caplog) -> None:
    from pictor.config import DEFAULT_MAX_PIXELS
    from pictor.core.embedder import create_embedder
    from pictor.core.gallery import read_gallery
    from pictor.indexer.pipeline import run_indexing

    entries = list(read_gallery(gallery))

    def interrupted_after_six() -> Iterator[GalleryEntry]:
        yield from entries[:6]
        raise KeyboardInterrupt

    embedder = create_embedder(device="cpu")
    with IndexStore.create(tmp_path / "index", embedder.spec) as store:
        caplog.set_level("INFO")
        summary = run_indexing(interrupted_after_six(), embedder, store, batch_size=2, total=len(entries),
                               max_pixels=DEFAULT_MAX_PIXELS, progress=False, log_every=1e-9)
        assert summary.interrupted
        assert 0 < summary.indexed == summary.inserted == len(store) <= 6
        # Run again: what the first run wrote is not embedded again.
        again = run_indexing(entries, embedder, store, batch_size=2, max_pixels=DEFAULT_MAX_PIXELS, progress=False)
        assert (again.unchanged, again.inserted, len(store)) == (summary.indexed, len(entries) - summary.indexed,
                                                                 len(entries))
    # Without a terminal for a bar, progress comes as log lines (every 30 s in the CLI).
    assert f"2 of {len(entries)} files done: 2 embedded (" in caplog.text


def test_an_interrupt_waits_until_a_written_batch_is_counted() -> None:
    from pictor.indexer.pipeline import interrupts_deferred

    # Ctrl-C as an interactive shell leaves it: a job a script puts in the background starts
    # with Ctrl-C ignored, and the deferred signal then did nothing when raised again.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before, steps = signal.getsignal(signal.SIGINT), []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after a commit
                time.sleep(0.05)  # Python runs a handler between bytecodes: time for it to act
                steps.append("counted")
        assert steps == ["counted"] and signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_index_refuses_another_backbone_on_existing_index(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out))
    r = pictor("index", str(gallery), "--out", str(out), "--weights", "random", check=False)
    assert r.returncode == 2
    assert "rebuild" in r.stderr or "re-embed" in r.stderr
    r = pictor("index", str(gallery), "--out", str(out), "--index-type", "HNSW32", check=False)
    assert r.returncode == 2 and "index type HNSW32 (from --index-type) applies to a new index only" in r.stderr
    # An index held by another process (a server) is refused before any model is loaded:
    # the bad backbone name is never reached.
    with IndexStore.open(out):
        r = pictor("index", str(gallery), "--out", str(out), "--backbone", "nosuch", check=False)
    assert r.returncode == 2 and "is open in another process" in r.stderr


def test_an_existing_index_is_extended_with_its_own_model(gallery: Path, tmp_path: Path) -> None:
    # As the README's "again later" line: no --backbone / --weights needed the second time.
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out), "--backbone", "resnet18", "--weights", "random",
           "--pooling", "gem", "--precision", "fp32")
    # A file gone bad since: skipped, its item kept and said to be; files that are not named as
    # images are counted, not read.
    bad = gallery / "warm" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:40])
    (gallery / "warm" / "IMG_7.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (gallery / "notes.txt").write_text("taken in May")
    (gallery / "cool" / "IMG_8.AVIF").write_bytes(drawn_image(20, fmt="AVIF"))  # a newer phone's photo
    r = pictor("index", str(gallery), "--out", str(out), "--prune", "--json")
    summary = json.loads(r.stdout)
    assert (summary["unchanged"], summary["inserted"], summary["skipped"], summary["index_size"]) == (11, 1, 1, 13)
    assert summary["failures"][0]["error"].endswith("; the index keeps its earlier item")
    assert summary["left_out"] == {".heic": 1, ".txt": 1} and "left out 2 files not named as images" in r.stderr
    with IndexStore.open(out) as store:
        assert (store.spec.backbone, store.spec.pooling) == ("resnet18", "gem")
        assert store.precision == "fp32"  # kept: a later run embeds as it did
    # Another precision is taken as asked, and said to mix (an index's own image scored 0.98).
    r = pictor("index", str(gallery), "--out", str(out), "--precision", "bf16")
    assert "holds vectors embedded at fp32; this run embeds at bf16, which differ a little" in r.stderr
    r = pictor("index", str(gallery), "--out", str(out), "--backbone", "resnet50", check=False)
    assert r.returncode == 2 and "resnet18" in r.stderr  # another backbone asked for: refused
    # The defaults asked for by name are asked for too (they were taken as "not set").
    r = pictor("index", str(gallery), "--out", str(out), "--pooling", "avg", "--backbone", "efficientnet_lite0",
               check=False)
    assert r.returncode == 2 and "this run asks for backbone efficientnet_lite0 (--backbone) and pooling avg (--pooling)" in r.stderr


def test_file_names_cannot_split_lines_or_json(tmp_path: Path) -> None:
    # A name with a line break was printed as it was: one skipped file read as two, and a name
    # could forge a line; a suffix of bytes that are not UTF-8 made --json's left_out invalid.
    gallery = tmp_path / "g" / "cls"
    gallery.mkdir(parents=True)
    (gallery / "good.png").write_bytes(drawn_image(1, 48, "PNG"))
    (gallery / "bad\nskipped forged.png").write_bytes(b"not an image")
    with open(os.fsencode(gallery / "notes.") + b"\xff", "wb"):
        pass
    r = pictor("index", str(tmp_path / "g"), "--out", str(tmp_path / "i1"), "--weights", "random")
    skipped = [line for line in r.stderr.splitlines() if "skipped" in line and "forged" in line]
    assert len(skipped) == 1 and "bad\\nskipped forged.png" in skipped[0], r.stderr
    r = pictor("index", str(tmp_path / "g"), "--out", str(tmp_path / "i2"), "--weights", "random", "--json")
    summary = json.loads(r.stdout)
    assert summary["left_out"] == {".\\xff": 1}
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # no lone surrogates left


def test_a_folder_name_that_is_not_utf8_is_named_not_its_files() -> None:
    from pictor.indexer.pipeline import split_misnamed

    entries = [GalleryEntry(key=k, path=Path(k)) for k in ("ok/a.jpg", "caf\udce9/b.jpg", "ok/caf\udce9.jpg")]
    good, bad = split_misnamed(entries)
    assert [e.key for e in good] == ["ok/a.jpg"]
    assert [why for _, why in bad] == [
        "caf\\xe9/b.jpg: the name of its folder caf\\xe9 is not UTF-8 text, which a key must be; rename the folder",
        "ok/caf\\xe9.jpg: the file name is not UTF-8 text, which a key must be; rename the file"]


def test_index_errors_are_clear(tmp_path: Path) -> None:
    r = pictor("index", check=False, cwd=tmp_path)  # GALLERY may come from the config file instead
    assert r.returncode == 2 and "no gallery: give GALLERY" in r.stderr
    r = pictor("index", str(tmp_path / "nope"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "no images found" in r.stderr
    (tmp_path / "header.csv").write_text("path,label\n")
    r = pictor("index", str(tmp_path / "header.csv"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "manifest " in r.stderr and "header.csv lists no images" in r.stderr
    (tmp_path / "empty" / "notes.jpg").write_text("not a picture")
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "pictor index: nothing could be indexed (1 skipped, listed above); no index was written" in r.stderr
    assert "index holds 0 items" not in r.stdout  # no summary of an index that is not written
    assert not (tmp_path / "i").exists()  # an empty index made by the failed run is not left behind
    (tmp_path / "lists").mkdir()  # paths written from the current folder, not the manifest's
    (tmp_path / "lists" / "m.csv").write_text("path\nempty/notes.jpg\n")
    r = pictor("index", str(tmp_path / "lists" / "m.csv"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and r.stderr.rstrip().endswith(
        "no index was written; a manifest's relative paths are read from its own folder, " + str(tmp_path / "lists"))
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "empty" / "notes.jpg"),
               check=False)
    assert r.returncode == 2 and "notes.jpg exists and is not an index store" in r.stderr
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "empty" / "notes.jpg" / "i"),
               check=False)
    assert r.returncode == 2 and "cannot create the index folder" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "j"), "--model", str(tmp_path / "junk.pt"),
               check=False)
    assert r.returncode == 2 and "not a Pictor model file" in r.stderr
    assert not (tmp_path / "j").exists()  # a run that fails before writing leaves no folder
    # Checked before the model loads (the junk weights would be named first otherwise).
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "k"), "--index-type", "Bogus",
               "--weights", str(tmp_path / "junk.pt"), check=False)
    assert r.returncode == 2 and "index type 'Bogus' is not one the index supports" in r.stderr
    assert not (tmp_path / "k").exists()


def test_sigterm_ends_the_run_like_ctrl_c(gallery: Path, tmp_path: Path) -> None:
    """`docker stop` sends SIGTERM: the run ends with its summary and exit 130, not silently."""
    more = gallery / "more"  # seconds of embedding one at a time: the signal comes well before the end
    more.mkdir()
    for i in range(200):
        (more / f"m{i:03d}.png").write_bytes(drawn_image(1000 + i))
    run = subprocess.Popen([sys.executable, "-m", "pictor.cli", "index", str(gallery), "--out",
                            str(tmp_path / "index"), "--batch-size", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    for line in run.stderr:
        if "created index store" in line:  # the model is loaded: the run is under way
            time.sleep(0.5)  # (into its first batches: a signal before them ends it with no summary)
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "interrupted" in err
    assert out.startswith("interrupted after indexing ")  # not "indexed ...": that reads as a finished run


def test_ctrl_c_in_the_final_re_training_still_gives_the_summary(gallery: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The re-training at the end of a run (minutes at scale) comes after every image is written:
    a Ctrl-C there printed only "interrupted", not what the run had done."""
    import contextlib

    bulk = IndexStore.bulk

    @contextlib.contextmanager
    def cut_short_at_its_end(store: IndexStore) -> Iterator[IndexStore]:
        with bulk(store):
            yield store
        raise KeyboardInterrupt  # (in the re-training itself in a real run)

    monkeypatch.setattr(IndexStore, "bulk", cut_short_at_its_end)
    out = tmp_path / "index"
    assert main(["index", str(gallery), "--out", str(out), "--no-progress", "--json"]) == 130
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    images = len(list(gallery.rglob("*.png")))
    assert summary["interrupted"] and summary["indexed"] == summary["index_size"] == images
    assert f"interrupted; the {images} images indexed before it are kept" in captured.err
    with IndexStore.open(out) as store:
        assert len(store) == images


def ctrl_c_before_the_first(run_indexing: Callable[..., Any]) -> Callable[..., Any]:
    """``run_indexing`` as Ctrl-C before its first image makes it."""
    def run(entries: object, *args: Any, **kwargs: Any) -> object:
        def interrupted() -> Iterator[GalleryEntry]:
            raise KeyboardInterrupt
            yield

        return run_indexing(interrupted(), *args, **kwargs)
    return run


def test_interrupted_before_the_first_image_leaves_no_index_and_prunes_nothing(
        gallery: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An empty index the run made would only be in the way (of a re-run with other flags)."""
    import pictor.indexer.pipeline as pipeline

    assert main(["index", str(gallery), "--out", str(tmp_path / "held"), "--device", "cpu"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "run_indexing", ctrl_c_before_the_first(pipeline.run_indexing))
    assert main(["index", str(gallery), "--out", str(tmp_path / "index"), "--device", "cpu"]) == 130
    assert "interrupted before any image was indexed; no index was written" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
    # Into an index that exists, with --prune: the summary says nothing was pruned, and why.
    assert main(["index", str(gallery), "--out", str(tmp_path / "held"), "--device", "cpu", "--prune"]) == 130
    summary = capsys.readouterr().out
    assert summary.startswith("interrupted after indexing 0 images (0 new, 0 replaced)")
    assert "; not pruned (only a complete run prunes)" in summary


def test_files_indexed_under_another_spelling_are_found_wherever_it_was_run(
        gallery: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A manifest's relative paths are keys relative to its own folder, and a folder indexed from
    beside it is keyed by its name: the other spellings of both are recognised from anywhere."""
    out, manifest = tmp_path / "index", gallery / "m.csv"
    files = sorted(gallery.rglob("*.png"))
    manifest.write_text("path,label\n" + "".join(f"{f.relative_to(gallery).as_posix()},x\n" for f in files))
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    assert main(["index", str(manifest), "--out", str(out), "--device", "cpu"]) == 0
    manifest.write_text("path,label\n" + "".join(f"{f},x\n" for f in files))  # absolute now
    assert main(["index", str(manifest), "--out", str(out), "--device", "cpu"]) == 0
    assert f"{len(files)} of these files are in the index already under another key" in capsys.readouterr().err
    monkeypatch.chdir(gallery.parent)
    assert main(["index", gallery.name, "--out", str(tmp_path / "by-name"), "--device", "cpu"]) == 0
    monkeypatch.chdir(tmp_path.parent)  # the same folder, named otherwise from elsewhere
    assert main(["index", str(gallery), "--out", str(tmp_path / "by-name"), "--device", "cpu"]) == 0
    assert f"{len(files)} of these files are in the index already under another key" in capsys.readouterr().err


def test_a_run_that_fails_beside_another_on_a_new_out_leaves_its_files(
        gallery: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Two first runs on one new --out at once: the one that loses the store's lock had made the
    folder too, and its clean-up found the other's files there (a traceback, exit 1)."""
    import pictor.indexer.cli as indexer_cli

    out = tmp_path / "index"

    def the_other_run_got_there_first(*args: Any) -> object:
        (out / "other-run.db").write_bytes(b"")
        raise InvalidRequestError(f"index store {out} is open in another process")

    monkeypatch.setattr(indexer_cli, "_embedder", the_other_run_got_there_first)
    assert main(["index", str(gallery), "--out", str(out), "--device", "cpu"]) == 2
    assert f"pictor index: error: index store {out} is open in another process" in capsys.readouterr().err
    assert (out / "other-run.db").exists()


def test_pca_whitened_index_serves_whitened_queries(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    r = pictor("index", str(gallery), "--out", str(out), "--pca-whiten", "8", "--json")
    summary = json.loads(r.stdout)
    assert "warning: --pca-whiten 8 fitted on 12 images, under twice its dims" in r.stderr
    assert "give a larger gallery, fewer dims" in r.stderr  # all 12 were the sample: --pca-sample cannot help
    assert summary["index_size"] == 12 and (out / WHITENING_FILE).is_file() and summary["whitening_seconds"] > 0
    engine = Engine.load(ServerSettings(index=str(out), device="cpu", precision="fp32"))
    try:
        assert engine.store.spec.dim == 8 and engine.store.spec.whitening.startswith("pca8:")
        assert engine.info().whitening == engine.store.spec.whitening  # Info says vectors must be whitened
        with pytest.raises(IncompatibleModelError, match="whitening"):  # unwhitened queries refused
            engine.store.check_spec(engine.embedder.spec)
        image = sorted(gallery.rglob("*.png"))[3]
        assert engine.embed([image.read_bytes()]).shape == (1, 8)
        assert engine.search(image=image.read_bytes(), k=3)[0].key == image.as_posix()
        assert engine.classify(image.read_bytes(), classifier="knn").labels[0][0] == image.parent.name
        new = drawn_image(77)
        engine.upsert([Item(key="new")], [new], [None])
        assert engine.search(image=new, k=1)[0].key == "new"
        assert engine.search(vector=engine.store.get_vector("new").tolist(), k=1)[0].key == "new"
        with pytest.raises(InvalidRequestError, match="8-d vectors .*pca8"):
            engine.search(vector=np.ones(engine.embedder.spec.dim).tolist())
    finally:
        engine.close()
    # A backup serves as the index does: its whitening comes along (checked as `serve` opens it).
    backup = pictor("backup", str(out), str(tmp_path / "copy"))
    assert "13 items (checked: it opens" in backup.stdout
    assert (tmp_path / "copy" / WHITENING_FILE).read_bytes() == (out / WHITENING_FILE).read_bytes()
    (tmp_path / "copy" / WHITENING_FILE).unlink()  # an index that cannot be served: refused, no copy made
    damaged = pictor("backup", str(tmp_path / "copy"), str(tmp_path / "copy2"), check=False)
    assert damaged.returncode == 2 and f"{tmp_path / 'copy' / WHITENING_FILE} is missing" in damaged.stderr
    assert not (tmp_path / "copy2").exists()
    sorted(gallery.rglob("*.png"))[0].write_bytes(drawn_image(76))
    again = json.loads(pictor("index", str(gallery), "--out", str(out), "--json").stdout)
    # The changed file is embedded and whitened as the index was (an unwhitened vector is refused).
    assert (again["replaced"], again["unchanged"], again["index_size"]) == (1, 11, 13)
    assert again["whitening_seconds"] is None  # fitted by the first run only
    other = pictor("index", str(gallery), "--out", str(out), "--pca-whiten", "4", check=False)
    assert other.returncode == 2 and "pca_whiten 4 (from --pca-whiten) would change its space" in other.stderr
    tiny = pictor("index", str(gallery), "--out", str(tmp_path / "i3"), "--pca-whiten", "64", check=False)
    assert tiny.returncode == 2 and "give --pca-whiten below 12 (less if some cannot be read)" in tiny.stderr  # before any model
    (gallery / "warm" / "broken.png").write_bytes(b"not a png")  # 13 listed, 12 readable
    few = pictor("index", str(gallery), "--out", str(tmp_path / "i2"), "--pca-whiten", "12", check=False)
    assert few.returncode == 2 and "needs more than 12 usable images in its sample, got 12 (1 of the 13" in few.stderr
    assert "broken.png" in few.stderr and "lower --pca-whiten or add images" in few.stderr  # all 13 were sampled


def test_the_whitening_fit_logs_progress_and_an_interrupted_fit_says_it_is_lost(
        gallery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The fit embeds a sample before the first image is indexed (minutes for a large one): it
    logs its progress as the run does, and Ctrl-C there says what is lost."""
    import pictor.indexer.pipeline as pipeline
    from pictor.config import DEFAULT_MAX_PIXELS
    from pictor.core.embedder import create_embedder
    from pictor.core.gallery import read_gallery

    caplog.set_level("INFO")
    entries = list(read_gallery(gallery))
    pipeline.fit_whitening(entries, create_embedder(device="cpu"), 4, sample=10, batch_size=4,
                           max_pixels=DEFAULT_MAX_PIXELS, progress=False, log_every=1e-9)
    assert "whitening sample: 4 of 10 images done: 4 embedded (" in caplog.text

    real = pipeline.embedded_batches

    def ctrl_c_after_one_batch(*args: Any, **kwargs: Any) -> Iterator[object]:
        batches = real(*args, **kwargs)
        yield next(batches)
        batches.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "embedded_batches", ctrl_c_after_one_batch)
    out = tmp_path / "index"
    assert main(["index", str(gallery), "--out", str(out), "--pca-whiten", "4", "--batch-size", "4"]) == 130
    assert capsys.readouterr().err.endswith(
        "pictor index: interrupted; while fitting the PCA-whitening (4 of its 12 sample images done); "
        "nothing is written before the fit ends, so the next run starts it over\n")
    assert not out.exists()
    monkeypatch.undo()
    # Fitted, then interrupted before the first images were written: the fit goes with the index.
    monkeypatch.setattr(pipeline, "run_indexing", ctrl_c_before_the_first(pipeline.run_indexing))
    assert main(["index", str(gallery), "--out", str(out), "--pca-whiten", "4"]) == 130
    assert ("interrupted before any image was indexed; no index was written (and its PCA-whitening fit is "
            "lost: the next run fits it again)") in capsys.readouterr().err
    monkeypatch.undo()
    # The summary counts the fit's time apart from the indexing's.
    assert main(["index", str(gallery), "--out", str(out), "--pca-whiten", "4"]) == 0
    assert re.search(r"into \S+ in \d+\.\ds after a \d+\.\ds PCA-whitening fit \(", capsys.readouterr().out)


def test_a_manifest_without_labels_is_indexed_with_a_warning(gallery: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt label column ('lable') became an attribute, and the index had no classes, unsaid."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,lable\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(gallery.rglob("*.png"))))
    out = str(tmp_path / "index")
    assert main(["index", str(manifest), "--out", out, "--device", "cpu"]) == 0
    assert (f"warning: manifest {manifest} gives no image a label (its other fields, kept as attributes: lable): "
            "the items are indexed unlabelled") in capsys.readouterr().err
    assert main(["index", str(manifest), "--out", out, "--labels", "none"]) == 0  # meant: not said
    assert "gives no image a label" not in capsys.readouterr().err


def test_an_embedding_that_underflowed_costs_its_file_not_the_run(tmp_path: Path) -> None:
    entries = [GalleryEntry(key=f"{n}.jpg", path=tmp_path / f"{n}.jpg") for n in ("good", "zero", "nan")]
    vectors = np.array([[0.6, 0.8], [0.0, 0.0], [np.nan, np.nan]], np.float32)
    tensors = [torch.zeros(3, 4, 4) for _ in entries]
    batch, kept = without_degenerate(DecodedBatch(entries, tensors, ["h1", "h2", "h3"], []), vectors, "fp16")
    assert [e.key for e in batch.entries] == ["good.jpg"] and len(batch.tensors) == 1 and batch.hashes == ["h1"]
    np.testing.assert_array_equal(kept, vectors[:1])
    assert [e.key for e, _ in batch.failures] == ["zero.jpg", "nan.jpg"]
    assert "all zero or not finite (at fp16; --precision fp32 may embed it)" in batch.failures[0][1]


def test_prune_keeps_the_items_of_a_folder_it_could_not_list(gallery: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out))
    unlistable(monkeypatch, gallery / "warm")  # 6 of the 12 images
    (gallery / "roses").mkdir()  # a class meant for the kNN vote, not filled yet
    (gallery / "notes").mkdir()
    (gallery / "notes" / "readme.txt").write_text("not an image")
    rc = main(["index", str(gallery), "--out", str(out), "--prune", "--json", "--no-progress"])
    output = capsys.readouterr()
    summary = json.loads(output.out)
    assert rc == 0 and (summary["unchanged"], summary["pruned"], summary["index_size"]) == (6, 0, 12)
    (failure,) = summary["failures"]
    assert failure["error"].endswith("warm: cannot list the folder (Permission denied); its images were "
                                     "left out and their items kept")
    # Said once each: the unreadable folder as a failure, the empty ones as a warning.
    assert f"warning: folders in {gallery} with no images, so no items with their label: notes, roses\n" in output.err


def test_a_system_error_on_a_file_names_the_file(gallery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Out of file descriptors, Pillow's import of a plugin fails: the error names the plugin's
    file, not the image's ("skipped [Errno 24] Too many open files: '.../BmpImagePlugin.py'")."""
    from pictor.indexer import pipeline

    victim = sorted(gallery.rglob("*.png"))[0]
    real = pipeline.load_image

    def no_fds(path: Path, **kwargs: Any) -> Image.Image:
        if Path(path) == victim:
            raise OSError(errno.EMFILE, "Too many open files", "/site-packages/PIL/BmpImagePlugin.py")
        return real(path, **kwargs)

    monkeypatch.setattr(pipeline, "load_image", no_fds)
    assert main(["index", str(gallery), "--out", str(tmp_path / "index"), "--json", "--no-progress"]) == 0
    (failure,) = json.loads(capsys.readouterr().out)["failures"]
    assert failure["error"].startswith(f"{victim}: [Errno 24] Too many open files")


def test_a_full_disk_ends_the_run_with_what_was_written(gallery: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = IndexStore.upsert

    def then_the_disk_fills(store: IndexStore, *args: Any, **kwargs: Any) -> object:
        result = real(store, *args, **kwargs)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        return result

    monkeypatch.setattr(IndexStore, "upsert", then_the_disk_fills)
    out = tmp_path / "index"
    args = ["index", str(gallery), "--out", str(out), "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main([*args, "--json", "--prune"]) == 2
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # (the error came alone, with no summary)
    assert (summary["indexed"], summary["index_size"]) == (4, 4) and summary["pruned"] == 0
    assert "is full; this write was not applied" in summary["stopped"]
    assert "the 4 images indexed before it are kept. Run the same command again" in captured.err
    monkeypatch.undo()  # space freed: the same command goes on from there
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["unchanged"], summary["inserted"], summary["stopped"]) == (4, 8, "")


def test_a_store_that_cannot_be_created_leaves_no_folder(gallery: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.errors import ResourceExhaustedError

    def disk_full(*args: object, **kwargs: object) -> IndexStore:
        raise ResourceExhaustedError("the disk holding out is full; no index store was created")

    monkeypatch.setattr(IndexStore, "create", disk_full)
    out = tmp_path / "new" / "index"
    assert main(["index", str(gallery), "--out", str(out), "--no-progress"]) != 0
    assert "is full" in capsys.readouterr().err
    assert not out.exists()  # the folder this run made for it is gone too


def test_a_whitening_that_cannot_be_saved_leaves_no_index(gallery: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.core.whitening import PCAWhitening

    def disk_full(self: PCAWhitening, directory: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PCAWhitening, "save", disk_full)
    out = tmp_path / "new" / "index"
    assert main(["index", str(gallery), "--out", str(out), "--pca-whiten", "8", "--no-progress"]) == 2
    assert "is full; no index store was created" in capsys.readouterr().err
    assert not out.exists()  # not a whitened index without its whitening, refused by every later run


def test_an_index_whose_creation_was_cut_off_is_made_anew(gallery: Path, tmp_path: Path) -> None:
    """A kill between the database and the manifest (which marks a store made) left files that
    every later run refused ("exists and is not an index store", or, whitened, "whitening.npz is
    missing"): there are no items in them, so the next run makes the index anew."""
    out = tmp_path / "index"
    out.mkdir()
    for name in ("LOCK", "metadata.sqlite", WHITENING_FILE, "manifest.json.4242.tmp"):
        (out / name).write_bytes(b"cut off")
    r = pictor("index", str(gallery), "--out", str(out), "--pca-whiten", "4", "--json")
    assert "under twice its dims" not in r.stderr  # 12 images for 4 dims
    assert json.loads(r.stdout)["index_size"] == 12 and "creation was cut off" in r.stderr
    found = pictor("index", str(gallery), "--out", str(out), "--json")  # opens, whitening and all
    assert json.loads(found.stdout)["unchanged"] == 12
