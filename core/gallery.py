"""What a gallery holds: a folder of images (label = class folder) or a CSV/JSONL manifest.

The reader stage of the indexer and the trainer's data loading both list images here. Pure
listing, no decoding: whoever decodes counts a bad file, so one never stops a listing.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pictor.errors import InvalidRequestError, NotFoundError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})


@dataclass(frozen=True)
class GalleryEntry:
    key: str  # user-facing id: the file's path as the user named it
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
    source: str | os.PathLike[str], *, labels: str = "folder", require_label: bool = False
) -> Iterator[GalleryEntry]:
    """Entries of a gallery directory (recursively, sorted) or of a ``.csv``/``.jsonl`` manifest.

    ``labels``: ``"folder"`` takes the name of the top-level folder an image sits in under
    ``source`` as its label (``photos/tulips/2020/a.jpg`` -> ``tulips``; none for images
    directly in the root), ``"none"`` gives no labels. Manifests carry their own;
    ``require_label`` makes a manifest without a label on every row an error.
    """
    src = Path(source)
    if not src.exists():
        raise NotFoundError(f"{src} does not exist")
    if src.is_file():
        yield from read_manifest(src, require_label=require_label)
        return
    if labels not in ("folder", "none"):
        raise InvalidRequestError(f"labels must be 'folder' or 'none' for a directory, got {labels!r}")
    for path in _walk_images(src):
        parts = path.relative_to(src).parts
        label = parts[0] if labels == "folder" and len(parts) > 1 else ""
        yield GalleryEntry(key=path.as_posix(), path=path, label=label)


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.thumbnails, .git) hold copies or tooling, not gallery images; sorted
        # so that ids and progress are reproducible.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_file(name):
                yield Path(dirpath) / name


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
    with manifest.open(newline="" if suffix == ".csv" else None, encoding="utf-8") as f:
        rows = _csv_rows(manifest, f, required) if suffix == ".csv" else _json_lines(manifest, f)
        yield from _entries(manifest, rows, required)


def _csv_rows(manifest: Path, f: Iterable[str], required: tuple[str, ...]
              ) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or ()]
    if not set(required) <= set(columns):
        raise InvalidRequestError(
            f"manifest {manifest} needs a header with {_columns(required)}, "
            f"got {sorted(columns) or 'no header'}"
        )
    reader.fieldnames = columns
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None and v is not None}


def _columns(names: tuple[str, ...]) -> str:
    quoted = " and ".join(repr(n) for n in names)
    return f"{quoted} columns" if len(names) > 1 else f"a {quoted} column"


def _json_lines(manifest: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{manifest}:{n}: not valid JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{manifest}:{n}: each line must be a JSON object")
        yield n, {k: str(v) for k, v in row.items()}


def _entries(manifest: Path, rows: Iterator[tuple[int, dict[str, str]]], required: tuple[str, ...]
             ) -> Iterator[GalleryEntry]:
    base = manifest.parent
    for line, row in rows:
        row = {k: v.strip() for k, v in row.items()}  # stray spaces around a path never help
        missing = [c for c in required if not row.get(c)]
        if missing:
            raise InvalidRequestError(f"{manifest}:{line}: no {' and no '.join(repr(c) for c in missing)}")
        raw = row.pop("path")
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        key = row.pop("key", "") or raw
        label = row.pop("label", "")
        yield GalleryEntry(key=key, path=path, label=label, attributes={k: v for k, v in row.items() if v})
