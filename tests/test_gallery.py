from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import unlistable

from pictor.core.gallery import read_gallery
from pictor.errors import InvalidRequestError, NotFoundError


def test_folder_labels_and_keys(gallery: Path) -> None:
    (gallery / "notes.txt").write_text("not an image")
    entries = list(read_gallery(gallery))
    assert len(entries) == 12
    assert {e.label for e in entries} == {"warm", "cool"}
    assert all(e.key == e.path.as_posix() for e in entries)
    assert entries == sorted(entries, key=lambda e: e.path.as_posix())
    assert {e.label for e in read_gallery(gallery, labels="none")} == {""}


def test_label_is_the_top_level_folder(tmp_path: Path) -> None:
    (tmp_path / "tulips" / "2020").mkdir(parents=True)
    (tmp_path / "tulips" / "2020" / "a.jpg").write_bytes(b"")
    (tmp_path / "loose.png").write_bytes(b"")
    assert {e.path.name: e.label for e in read_gallery(tmp_path)} == {"a.jpg": "tulips", "loose.png": ""}


def test_labels_that_look_alike_are_one_label(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # macOS may write "rosés" decomposed (e + combining accent): the same class as typed.
    composed, decomposed = "ros\u00e9s", "rose\u0301s"
    (tmp_path / "tree" / decomposed).mkdir(parents=True)
    (tmp_path / "tree" / decomposed / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "m.csv").write_text(f"path,label\nb.jpg,{decomposed}\n", encoding="utf-8")
    assert [e.label for e in read_gallery(tmp_path / "tree")] == [composed]
    assert [e.label for e in read_gallery(tmp_path / "m.csv")] == [composed]
    # Two folders so named are one class, and the run says so (the names look alike).
    (tmp_path / "tree" / composed).mkdir()
    (tmp_path / "tree" / composed / "c.jpg").write_bytes(b"")
    (tmp_path / "tree" / composed / "d.jpg").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert {e.label for e in read_gallery(tmp_path / "tree")} == {composed}
    assert caplog.text.count("are the same label in Unicode NFC") == 1
    assert "'ros\\xe9s'" in caplog.text and "'rose\\u0301s'" in caplog.text


def test_a_folder_name_that_cannot_be_a_label_is_refused(tmp_path: Path) -> None:
    # Before any image is embedded: else `pictor train` failed at the end with a traceback
    # (a name that is not UTF-8), or kept a class name with a line break that splits tables.
    for name, why in ((b"caf\xe9", r"class folder .*caf\\xe9 in .*: the folder name is not UTF-8 text"),
                      (b"new\nline", r"class folder 'new\\nline' .* holds a control character")):
        root = tmp_path / name.hex()
        (root / "ok").mkdir(parents=True)
        (root / "ok" / "a.jpg").write_bytes(b"")
        os.mkdir(os.fsencode(root) + b"/" + name)
        with open(os.fsencode(root) + b"/" + name + b"/b.jpg", "wb"):
            pass
        with pytest.raises(InvalidRequestError, match=why + ".*; rename the folder"):
            list(read_gallery(root))
        assert len(list(read_gallery(root, labels="none"))) == 2  # no labels: nothing to refuse


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,key,colour\na.png,cat,item-a,red\n/abs/b.jpg,dog,,\n")
    a, b = read_gallery(csv)
    assert (a.key, a.label, a.path, a.attributes) == ("item-a", "cat", tmp_path / "a.png", {"colour": "red"})
    assert (b.key, b.path) == ("/abs/b.jpg", Path("/abs/b.jpg"))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a.png", "label": "cat"}) + "\n\n")
    assert [e.label for e in read_gallery(jsonl)] == ["cat"]
    # --labels none drops a manifest's labels too (it was ignored), and a typo is refused for both.
    assert [e.label for e in read_gallery(jsonl, labels="none")] == [""]
    with pytest.raises(InvalidRequestError, match="labels must be 'folder' or 'none', got 'nope'"):
        list(read_gallery(jsonl, labels="nope"))


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        list(read_gallery(tmp_path / "nope"))
    bad = tmp_path / "m.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:1"):
        list(read_gallery(bad))
    nopath = tmp_path / "m.csv"
    nopath.write_text("label\ncat\n")
    with pytest.raises(InvalidRequestError, match="needs a header with a 'path' column, got \\['label'\\]"):
        list(read_gallery(nopath))
    (tmp_path / "m.txt").write_text("a.png\n")
    with pytest.raises(InvalidRequestError, match="folder of images .* or a .csv/.jsonl manifest"):
        list(read_gallery(tmp_path / "m.txt"))
    # An unquoted comma shifts the cells: path "imgs/a", label "b.jpg" would be a silent guess.
    ragged = tmp_path / "r.csv"
    ragged.write_text('path,label\n"imgs/x,y.jpg",daisy\nimgs/a,b.jpg,daisy\n')
    with pytest.raises(InvalidRequestError, match='r.csv:3: 3 cells for 2 columns; quote a cell that holds a comma'):
        list(read_gallery(ragged))
    ragged.write_text("path,label\na.jpg,x\nb.jpg\n")  # a label missing, or a cell lost in an edit?
    with pytest.raises(InvalidRequestError, match=r'r.csv:3: 1 cell for 2 columns; write an empty cell with its '
                                                  r'comma \("a.jpg," for no label\)'):
        list(read_gallery(ragged))
    ragged.write_text("path,label,label\na.jpg,x,y\n")
    with pytest.raises(InvalidRequestError, match="the header names 'label' more than once"):
        list(read_gallery(ragged))


def test_required_labels_name_the_manifest_line(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n a.png , cat \nb.png,\n")
    assert [e.label for e in read_gallery(csv)] == ["cat", ""]  # optional by default, trimmed
    with pytest.raises(InvalidRequestError, match="m.csv:3: 'label' is empty$"):
        list(read_gallery(csv, require_label=True))
    csv.write_text("path\na.png\n")
    with pytest.raises(InvalidRequestError, match="'path' and 'label' columns, got \\['path'\\]$"):
        list(read_gallery(csv, require_label=True))
    csv.write_text("Path,Label\na.png,cat\n")  # as a spreadsheet may write it
    with pytest.raises(InvalidRequestError, match="got \\['Path', 'Label'\\]; names are lower case$"):
        list(read_gallery(csv))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a.png", "label": "cat"}) + "\n\n" + json.dumps({"label": "dog"}) + "\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:3: no 'path' \\(its fields: 'label'\\)$"):
        list(read_gallery(jsonl))
    jsonl.write_text(json.dumps({"Path": "a.png", "Label": "cat"}) + "\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: no 'path' and no 'label' \\(its fields: 'Path', "
                                                  "'Label'; names are lower case\\)"):
        list(read_gallery(jsonl, require_label=True))
    jsonl.write_text('{"path": "a.png", "label": "x", "label": "y", "c": 1}\n')  # json would keep "y"
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: the object names 'label' more than once"):
        list(read_gallery(jsonl))
    jsonl.write_text(json.dumps({"path": "a.png", "label": "  "}) + "\n")  # trimmed (see the next test)
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: 'label' is empty$"):
        list(read_gallery(jsonl, require_label=True))


def test_hidden_files_and_folders_are_not_listed(tmp_path: Path) -> None:
    (tmp_path / "cats" / ".thumbnails").mkdir(parents=True)
    for name in ("cats/a.jpg", "cats/._a.jpg", "cats/.thumbnails/a.jpg", "cats/a.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [e.path.name for e in read_gallery(tmp_path)] == ["a.jpg"]


def test_manifest_text_as_spreadsheets_and_scripts_write_it(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts with a byte-order mark, and so do some JSONL writers.
    csv = tmp_path / "m.csv"
    csv.write_bytes("\ufeffpath,label\r\na.png,café\r\n".encode())
    assert [(e.key, e.label) for e in read_gallery(csv)] == [("a.png", "café")]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes("\ufeff".encode() + b'{"path": "a.png", "label": 3, "f": 1.50}\n')
    [entry] = read_gallery(jsonl)
    assert (entry.label, entry.attributes) == ("3", {"f": "1.50"})  # numbers as written
    csv.write_bytes("path,label\na.png,daisy\nb.png,café\n".encode("latin-1"))
    with pytest.raises(InvalidRequestError, match=r"m.csv:3 is not UTF-8 text \(byte 0xe9\)"):  # line: where to look
        list(read_gallery(csv))


def test_jsonl_null_is_absent_and_other_values_refused(tmp_path: Path) -> None:
    jsonl = tmp_path / "m.jsonl"
    rows = [{"path": "a.png", "label": None, "key": None, "note": None},
            {"path": " b.png", "label": " spaced ", "key": " k "}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_gallery(jsonl)
    assert (a.key, a.label, a.attributes) == ("a.png", "", {})  # not the string "None"
    # The key and path exactly as JSON says; the label trimmed as a CSV cell is: "cat " would be
    # a second class that looks like "cat".
    assert (b.key, b.label, b.path.name) == (" k ", "spaced", " b.png")
    for value, got in (({"x": 1}, "an object"), ([1], "a list"), (True, "true")):
        jsonl.write_text(json.dumps({"path": "a.png", "label": value}) + "\n")
        with pytest.raises(InvalidRequestError, match=f"m.jsonl:1: field 'label' must be a string or a number, got {got}$"):
            list(read_gallery(jsonl))
    jsonl.write_text('{"path": 5, "key": 17}\n')  # a number is a fine key, and names no file
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: field 'path' must be a string .* got the number 5"):
        list(read_gallery(jsonl))


def test_manifest_rows_that_cannot_be_items_are_refused_up_front(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,key\na.png,x,K\nb.png,y,\nc.png,z,K\n")
    with pytest.raises(InvalidRequestError, match="m.csv:4: key 'K' is already on line 2"):
        list(read_gallery(csv))
    csv.write_text("path,label\na.png,x\n./a.png,y\n")  # no key: the path, as a folder lists it
    with pytest.raises(InvalidRequestError, match="m.csv:3: key 'a.png' is already on line 2"):
        list(read_gallery(csv))
    csv.write_text(f"path,key\na.png,{'k' * 5000}\n")
    with pytest.raises(InvalidRequestError, match="m.csv:2: the key is 5,000 characters long; at most 4,096"):
        list(read_gallery(csv))
    # A quote never closed would swallow the rest of the file into one cell: named where it opens.
    csv.write_text('path,label\na.png,x\n"b.png,y\nc.png,z\n')
    with pytest.raises(InvalidRequestError, match="m.csv:3: not valid CSV .*a quote that opens a cell must close it"):
        list(read_gallery(csv))
    csv.write_text('path,label\n"a.png",x\n"multi\nline.png",y\n"b.png",z\n')  # a quoted newline is fine
    assert [e.label for e in read_gallery(csv)] == ["x", "y", "z"]
    csv.write_text("path,label,\na.png,x,y\n")  # an unnamed column would be an attribute named ""
    with pytest.raises(InvalidRequestError, match="column 3 of the header has no name"):
        list(read_gallery(csv))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a.png", "": "y"}) + "\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: a field has an empty name"):
        list(read_gallery(jsonl))
    csv.write_text("file,class\na.png,x\n")  # the header as written, not sorted
    with pytest.raises(InvalidRequestError, match=r"got \['file', 'class'\]"):
        list(read_gallery(csv))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a\0b.png"}) + "\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: the path contains a NUL byte"):
        list(read_gallery(jsonl))
    # What the store would refuse, refused here with the line: not after half the gallery is written.
    jsonl.write_text(json.dumps({"path": "a.png"}) + "\n" + json.dumps({"path": "b.png", "label": "x\0y"}) + "\n")
    with pytest.raises(InvalidRequestError, match=r"m.jsonl:2: item 'b.png': the label 'x.x00y' holds a NUL"):
        list(read_gallery(jsonl))
    jsonl.write_text(json.dumps({"path": "a.png", "label": "tulips\nred"}) + "\n")  # would split a table's row
    with pytest.raises(InvalidRequestError, match=r"m.jsonl:1: item 'a.png': the label 'tulips.nred' holds a "
                                                  r"control character \(U\+000A"):
        list(read_gallery(jsonl))
    jsonl.write_text(json.dumps({"path": "a.png", "label": "tulips\u2028red"}) + "\n")  # a line break to str.splitlines
    with pytest.raises(InvalidRequestError, match=r"the label 'tulips.u2028red' holds a control character \(U\+2028"):
        list(read_gallery(jsonl))
    csv.write_text("path,label\nhttps://example.com/a.png,x\n")  # no download: a clear refusal, not "no such file"
    with pytest.raises(InvalidRequestError, match="m.csv:2: 'https://example.com/a.png' is a URL; Pictor reads "
                                                  "image files on this machine"):
        list(read_gallery(csv))
    for row in ({"path": "a.png", "label": "ro\ud800ses"}, {"path": "a.png", "key": "k\ud800"},
                {"path": "a.png", "note\udc00": "x"}):  # json.dumps writes them as \u escapes
        jsonl.write_text(json.dumps(row) + "\n")
        with pytest.raises(InvalidRequestError, match="m.jsonl:1: field .* half of a UTF-16 surrogate pair"):
            list(read_gallery(jsonl))
    jsonl.write_text(json.dumps({"path": "a.png", "note": "n" * 70_000}) + "\n")
    with pytest.raises(InvalidRequestError, match="m.jsonl:1: item 'a.png': its attributes take 70,012 characters"):
        list(read_gallery(jsonl))


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    photos = tmp_path / "elsewhere" / "daisy"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"")
    gallery = tmp_path / "gallery"
    (gallery / "roses").mkdir(parents=True)
    (gallery / "roses" / "b.jpg").write_bytes(b"")
    (gallery / "daisy").symlink_to(photos)  # a class folder kept elsewhere
    (gallery / "roses" / "loop").symlink_to(gallery)  # a link back up must not loop
    assert {e.path.name: e.label for e in read_gallery(gallery)} == {"a.jpg": "daisy", "b.jpg": "roses"}
    # A link to a class folder that is also in the gallery: the folder keeps its own label,
    # whichever name sorts first (best -> tulips; roses/more -> tulips).
    (gallery / "tulips").mkdir()
    (gallery / "tulips" / "c.jpg").write_bytes(b"")
    (gallery / "best").symlink_to(gallery / "tulips")
    (gallery / "roses" / "more").symlink_to(gallery / "tulips")
    assert {e.path.name: e.label for e in read_gallery(gallery)} == {
        "a.jpg": "daisy", "b.jpg": "roses", "c.jpg": "tulips"}
    # A gallery named through a link is listed as usual.
    (tmp_path / "via").symlink_to(gallery)
    assert len(list(read_gallery(tmp_path / "via"))) == 3


def test_a_folder_that_cannot_be_listed_is_reported_not_dropped(tmp_path: Path, monkeypatch, caplog) -> None:
    for name in ("a/ok.png", "a/locked/in.png", "b/x.png"):
        (tmp_path / "g" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / name).write_bytes(b"")
    unlistable(monkeypatch, tmp_path / "g" / "a" / "locked")
    unlisted: list[tuple[Path, str]] = []
    with caplog.at_level(logging.WARNING):
        keys = [e.key for e in read_gallery(tmp_path / "g", unlisted=unlisted)]
    assert keys == [(tmp_path / "g" / n).as_posix() for n in ("a/ok.png", "b/x.png")]
    assert unlisted == [(tmp_path / "g" / "a" / "locked", "Permission denied")]
    assert "cannot list" in caplog.text and "locked" in caplog.text
    unlistable(monkeypatch, tmp_path / "g")
    with pytest.raises(InvalidRequestError, match="cannot list .*g: Permission denied"):
        list(read_gallery(tmp_path / "g"))
