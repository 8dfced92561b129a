"""What a gallery holds: a folder of images (label = class folder) or a CSV/JSONL manifest.

The reader stage of the indexer and the trainer's data loading both list images here. Pure
listing, no decoding: whoever decodes counts a bad file, so one never stops a listing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pictor.api import MAX_KEY_LEN, canonical_label
from pictor.core.store_types import Item, check_label, checked_items
from pictor.errors import InvalidRequestError, NotFoundError, shown
from pictor.image_files import path_key, path_text

log = logging.getLogger(__name__)

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a manifest's path that is a URL (scheme://...)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})


@dataclass(frozen=True)
class GalleryEntry:
    key: str  # user-facing id: the file's path as the user named it, normalised (./a//b.jpg: a/b.jpg)
    path: Path
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


def is_image_file(name: str) -> bool:
    """Whether a file name is one a gallery lists (hidden files, e.g. macOS ``._x.jpg``, are not)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def image_suffixes_text() -> str:
    """The listed suffixes, for messages that say what was looked for."""
    return " ".join(sorted(IMAGE_SUFFIXES))


def read_gallery(
    source: str | os.PathLike[str], *, labels: str = "folder", require_label: bool = False,
    unlisted: list[tuple[Path, str]] | None = None, passed_over: Counter[str] | None = None,
) -> Iterator[GalleryEntry]:
    """Entries of a gallery directory (recursively, sorted) or of a ``.csv``/``.jsonl`` manifest.

    ``labels``: ``"folder"`` takes the name of the top-level folder an image sits in under
    ``source`` as its label (``photos/tulips/2020/a.jpg`` -> ``tulips``; none for images
    directly in the root; a folder name that cannot be a label, not UTF-8 or with a line
    break, is an error), ``"none"`` gives no labels. Manifests carry their own (dropped with
    ``"none"``); ``require_label`` makes a manifest without a label on every row an error.

    A folder under ``source`` that cannot be listed (no permission) is skipped with a warning,
    and appended to ``unlisted`` as (folder, why) when given: its images are unknown, not gone.
    Files not named as images (``.heic``, ``.txt``) are left out with a warning, and counted by
    suffix in ``passed_over`` when given.
    """
    if labels not in ("folder", "none"):
        raise InvalidRequestError(f"labels must be 'folder' or 'none', got {labels!r}")
    src = Path(source)
    if not src.exists():
        raise NotFoundError(f"{src} does not exist")
    if src.is_file():
        listed = False
        for entry in read_manifest(src, require_label=require_label):
            listed = True
            yield entry if labels == "folder" else replace(entry, label="")
        if not listed:  # (a header alone): not "no images found", with the suffixes a folder is searched for
            raise InvalidRequestError(f"manifest {src} lists no images")
        return
    folder_of: dict[str, str] = {}  # label -> the folder name that first gave it
    merged: set[str] = set()
    for path in _walk_images(src, unlisted if unlisted is not None else [],
                             passed_over if passed_over is not None else Counter()):
        parts = path.relative_to(src).parts
        label = canonical_label(parts[0]) if labels == "folder" and len(parts) > 1 else ""
        if label and label not in folder_of:
            _check_folder_label(src, parts[0], label)
        first = folder_of.setdefault(label, parts[0])
        if label and first != parts[0] and parts[0] not in merged:
            merged.add(parts[0])
            log.warning("folders %s and %s in %s are the same label in Unicode NFC, as labels are kept: "
                        "their images are one class, %r", ascii(first), ascii(parts[0]), src, label)
        yield GalleryEntry(key=path_key(path), path=path, label=label)


def _check_folder_label(source: Path, folder: str, label: str) -> None:
    """Refuse a class folder whose name cannot be a label, before any image is embedded: the
    index would refuse it after a run had begun, and a model file or eval's JSON cannot hold it."""
    if path_text(folder) != folder:
        raise InvalidRequestError(f"class folder {path_text(folder)} in {path_text(source)}: the folder name "
                                  "is not UTF-8 text, which a label must be; rename the folder")
    try:
        check_label(label, f"class folder {folder!r} in {source}")
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{e}; rename the folder") from None


def classless_folders(source: str | os.PathLike[str], entries: Iterable[GalleryEntry]) -> list[str]:
    """The top-level folders of a gallery folder in which no image was listed (empty, holding
    files of other types, or unreadable): the user meant them as classes, and they have none of
    its images. A link to a class folder is not one (the listing said it was not listed again)."""
    root = Path(source)
    if not root.is_dir():
        return []
    labels, listed = set(), set()
    for e in entries:
        labels.add(e.label)
        listed.add(os.path.realpath(root / e.path.relative_to(root).parts[0]))
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and canonical_label(p.name) not in labels  # labels are NFC; macOS names NFD
                  and os.path.realpath(p) not in listed)


def relative_paths_hint(source: str | os.PathLike[str]) -> str:
    """For an error saying no listed image could be read: where a manifest's relative paths
    are read from (its own folder: a manifest written from another one lists none); "" for a
    folder of images."""
    p = Path(source)
    return f"; a manifest's relative paths are read from its own folder, {p.parent}" if p.is_file() else ""


def _walk_images(root: Path, unlisted: list[tuple[Path, str]], passed_over: Counter[str]) -> Iterator[Path]:
    # Symlinked folders are followed (a class folder is often a link to where the photos
    # live); each real folder is listed once, which also ends a link back to an ancestor. A
    # folder that is also under the root without a link is listed there, whatever sorts first,
    # so that a link (best -> tulips) never takes its images' label.
    plain = set()
    for dirpath, dirnames, _ in os.walk(root):
        _hide(dirnames)
        plain.add(_folder_id(dirpath))
    real_root = os.path.realpath(root)
    visited: set[tuple[int, int]] = set()
    def cannot_list(e: OSError) -> None:
        folder, why = Path(e.filename), e.strerror or str(e)
        if folder == root:
            raise InvalidRequestError(f"cannot list {root}: {why}")
        log.warning("cannot list %s (%s): its images are left out", folder, why)
        unlisted.append((folder, why))

    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list, followlinks=True):
        folder = _folder_id(dirpath)
        where = os.path.normpath(os.path.join(real_root, os.path.relpath(dirpath, root)))
        linked = os.path.realpath(dirpath) != where  # reached through a link below the root
        if folder in visited or (linked and folder in plain):
            log.warning("%s is a link to a folder listed %s; not listed again", dirpath,
                        "already" if folder in visited else "at its own place")
            dirnames[:] = []
            continue
        visited.add(folder)
        _hide(dirnames)
        for name in sorted(filenames):
            if is_image_file(name):
                yield Path(dirpath) / name
            elif not name.startswith("."):
                passed_over[path_text(Path(name).suffix.lower()) or "(no suffix)"] += 1
    if passed_over:  # a folder of .HEIC photos would otherwise vanish without a word
        log.warning("left out %d file%s not named as images (%s); listed are %s", passed_over.total(),
                    "" if passed_over.total() == 1 else "s",
                    ", ".join(f"{n} {suffix}" for suffix, n in passed_over.most_common()),
                    image_suffixes_text())


def _hide(dirnames: list[str]) -> None:
    """Leave out hidden folders (.thumbnails, .git: copies or tooling, not gallery images), in
    place as os.walk wants; sorted, so that ids and progress are reproducible."""
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def _folder_id(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def read_manifest(manifest: Path, *, require_label: bool = False) -> Iterator[GalleryEntry]:
    """CSV with a header, or JSONL; fields ``path`` (required), ``label``, ``key``; other
    fields become attributes. Relative paths are relative to the manifest's folder. Errors
    name the manifest's line (``m.csv:3: ...``)."""
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InvalidRequestError(
            f"{manifest} must be a folder of images (one sub-folder per label) or a .csv/.jsonl manifest"
        )
    required = ("path", "label") if require_label else ("path",)
    try:
        # utf-8-sig: spreadsheets ("CSV UTF-8") start the file with a byte-order mark.
        with manifest.open(newline="" if suffix == ".csv" else None, encoding="utf-8-sig") as f:
            rows = _csv_rows(manifest, f, required) if suffix == ".csv" else _json_lines(manifest, f)
            yield from _entries(manifest, rows, required)
    except UnicodeDecodeError as e:  # (decoded in chunks: e.start says not where in the file)
        line, byte = _first_non_utf8(manifest) or (0, e.object[e.start])
        raise InvalidRequestError(f"manifest {manifest}{f':{line}' if line else ''} is not UTF-8 text "
                                  f"(byte {byte:#04x}); save it as UTF-8") from e


def _first_non_utf8(path: Path) -> tuple[int, int] | None:
    """The line number and byte of ``path``'s first byte that is not UTF-8 (None: none found)."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return number, line[e.start]
    return None


def _csv_rows(manifest: Path, f: Iterable[str], required: tuple[str, ...]
              ) -> Iterator[tuple[int, dict[str, str]]]:
    # strict: a quote never closed is an error, not a cell that swallows the rest of the file.
    reader = csv.DictReader(f, strict=True)
    try:
        columns = [c.strip() for c in reader.fieldnames or ()]
    except csv.Error as e:
        raise _csv_error(manifest, 1, e) from e
    if missing := [c for c in required if c not in columns]:
        raise InvalidRequestError(f"manifest {manifest} needs a header with {_columns(required)}, "
                                  f"got {columns or 'no header'}{_case_hint(columns, missing)}")
    if "" in columns:
        raise InvalidRequestError(f"manifest {manifest}: column {columns.index('') + 1} of the header has "
                                  "no name; name it (it would be an attribute), or remove it")
    if twice := sorted({c for c in columns if columns.count(c) > 1}):
        raise InvalidRequestError(f"manifest {manifest}: the header names {', '.join(map(repr, twice))} "
                                  "more than once; which column counts would be a guess")
    reader.fieldnames = columns
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: name the row's first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _csv_error(manifest, start, e) from e
        if None in row:  # more cells than the header names: DictReader's extras
            raise InvalidRequestError(
                f"{manifest}:{reader.line_num}: {len(columns) + len(row[None])} cells for {len(columns)} "
                "columns; quote a cell that holds a comma (\"a,b.jpg\")")
        if (cells := sum(v is not None for v in row.values())) < len(columns):  # DictReader's fill
            raise InvalidRequestError(
                f"{manifest}:{reader.line_num}: {cells} cell{'s' if cells != 1 else ''} for {len(columns)} "
                "columns; write an empty cell with its comma (\"a.jpg,\" for no label)")
        # Stray spaces around a CSV cell ("a.jpg, tulips") never help.
        yield reader.line_num, {k: v.strip() for k, v in row.items() if v is not None}


def _csv_error(manifest: Path, line: int, e: csv.Error) -> InvalidRequestError:
    return InvalidRequestError(
        f"{manifest}:{line}: not valid CSV ({e}): a quote that opens a cell must close it, and a "
        'quote inside a quoted cell is written twice ("a ""b"".jpg")'
    )


def _case_hint(names: Iterable[str], missing: list[str]) -> str:
    """A hint when a missing column is there in other case ("Path", as spreadsheets write it)."""
    return "; names are lower case" if any(n.lower() in missing for n in names) else ""


def _columns(names: tuple[str, ...]) -> str:
    quoted = " and ".join(repr(n) for n in names)
    return f"{quoted} columns" if len(names) > 1 else f"a {quoted} column"


def _json_lines(manifest: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_int=_Number, parse_float=_Number, object_pairs_hook=_once_each)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{manifest}:{n}: not valid JSON: {e.msg}") from e
        except _RepeatedNames as e:  # as a CSV header that names a column twice
            raise InvalidRequestError(f"{manifest}:{n}: the object names {e} more than once; which one "
                                      "counts would be a guess") from None
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{manifest}:{n}: each line must be a JSON object")
        if isinstance(row.get("path"), _Number):  # a number names no image file
            raise InvalidRequestError(f"{manifest}:{n}: field 'path' must be a string (the file's path), "
                                      f"got the number {row['path']}")
        fields = {k: _json_text(f"{manifest}:{n}", k, v) for k, v in row.items() if v is not None}
        if "label" in fields:  # as a CSV cell: "roses " and "roses" would be two classes that look alike
            fields["label"] = fields["label"].strip()
        yield n, fields


class _RepeatedNames(ValueError):
    pass


def _once_each(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refused when it names a field twice (json keeps the last, silently)."""
    names = [name for name, _ in pairs]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise _RepeatedNames(", ".join(map(repr, twice)))
    return dict(pairs)


class _Number(str):
    """A JSON number kept as written: ``1.50`` stays "1.50", as a CSV cell would, so a filter
    on the text the user wrote matches."""


def _json_text(where: str, name: str, value: object) -> str:
    """A JSONL field as text: strings as they are, numbers as written; null means absent."""
    if not isinstance(value, str):  # (dumped, an object's numbers would show as strings: _Number)
        kind = "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else json.dumps(value)
        raise InvalidRequestError(f"{where}: field {name!r} must be a string or a number, got {kind}")
    for text in (name, value):  # JSON's \ud800 escapes decode to lone surrogates, which no text holds
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"{where}: field {shown(name)} holds {text[e.start]!r}, half of a UTF-16 surrogate pair "
                "(a JSON \\u escape), which is not text; write the character itself") from None
    return str(value)


def _entries(manifest: Path, rows: Iterator[tuple[int, dict[str, str]]], required: tuple[str, ...]
             ) -> Iterator[GalleryEntry]:
    base = manifest.parent
    first_line: dict[str, int] = {}  # key -> the line that gave it
    for line, row in rows:
        where = f"{manifest}:{line}"
        missing = [c for c in required if not row.get(c)]
        if missing:
            fields = ""
            if row and any(c not in row for c in missing):  # a JSONL line's own names ("Path")
                fields = f" (its fields: {', '.join(map(repr, row))}{_case_hint(row, missing)})"
            said = " and ".join(f"{c!r} is empty" if c in row else f"no {c!r}" for c in missing)
            raise InvalidRequestError(f"{where}: {said}{fields}")
        raw = row.pop("path")
        if "\0" in raw:
            raise InvalidRequestError(f"{where}: the path contains a NUL byte")
        if _URL.match(raw):
            raise InvalidRequestError(f"{where}: {shown(raw, 200)} is a URL; Pictor reads image files on this "
                                      "machine: download them and list their paths")
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        key = row.pop("key", "") or path_key(raw)  # as a folder listing writes it: a/b.jpg
        if len(key) > MAX_KEY_LEN:
            raise InvalidRequestError(f"{where}: the key is {len(key):,} characters long; "
                                      f"at most {MAX_KEY_LEN:,}")
        if key in first_line:  # which row would win is a guess: ask
            raise InvalidRequestError(
                f"{where}: key {key!r} is already on line {first_line[key]}; each row must be "
                "another item (the key is the 'key' field, else the path)"
            )
        first_line[key] = line
        label = canonical_label(row.pop("label", ""))
        if any(not name.strip() for name in row):  # a JSONL field named "" (a CSV header's is refused up front)
            raise InvalidRequestError(f"{where}: a field has an empty name; name it, or leave it out")
        attributes = {k: v for k, v in row.items() if v}
        try:  # as the store will: here, before a run has written half the gallery
            checked_items([Item(key=key, label=label, attributes=attributes)])
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{where}: {e}") from None
        yield GalleryEntry(key=key, path=path, label=label, attributes=attributes)
