"""What a gallery holds: a folder of images (label = class folder) or a CSV/JSONL manifest.

The reader stage of the indexer and the trainer's data loading both list images here. Pure
listing, no decoding: whoever decodes counts a bad file, so one never stops a listing.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pictor.errors import InvalidRequestError, NotFoundError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class GalleryEntry:
    key: str  # user-facing id: the file's path as the user named it
    path: Path
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


def read_gallery(source: str | os.PathLike[str], *, labels: str = "folder") -> Iterator[GalleryEntry]:
    """Entries of a gallery directory (recursively, sorted) or of a ``.csv``/``.jsonl`` manifest.

    ``labels``: ``"folder"`` takes the name of the top-level folder an image sits in under
    ``source`` as its label (``photos/tulips/2020/a.jpg`` -> ``tulips``; none for images
    directly in the root), ``"none"`` gives no labels. Manifests carry their own.
    """
    src = Path(source)
    if not src.exists():
        raise NotFoundError(f"gallery {src} does not exist")
    if src.is_file():
        yield from read_manifest(src)
        return
    if labels not in ("folder", "none"):
        raise InvalidRequestError(f"labels must be 'folder' or 'none' for a directory, got {labels!r}")
    for path in _walk_images(src):
        parts = path.relative_to(src).parts
        label = parts[0] if labels == "folder" and len(parts) > 1 else ""
        yield GalleryEntry(key=path.as_posix(), path=path, label=label)


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic order, so ids and progress are reproducible
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                yield Path(dirpath) / name


def read_manifest(manifest: Path) -> Iterator[GalleryEntry]:
    """CSV with a header, or JSONL; fields ``path`` (required), ``label``, ``key``; other
    fields become attributes. Relative paths are relative to the manifest's folder."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with manifest.open(newline="") as f:
            rows: Iterator[dict[str, str]] = csv.DictReader(f)
            yield from _entries(manifest, rows)
    elif suffix in (".jsonl", ".ndjson"):
        with manifest.open() as f:
            yield from _entries(manifest, _json_lines(manifest, f))
    else:
        raise InvalidRequestError(f"{manifest}: a manifest must be .csv or .jsonl")


def _json_lines(manifest: Path, lines: Iterator[str]) -> Iterator[dict[str, str]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{manifest}:{n}: not valid JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{manifest}:{n}: each line must be a JSON object")
        yield {k: str(v) for k, v in row.items()}


def _entries(manifest: Path, rows: Iterator[dict[str, str]]) -> Iterator[GalleryEntry]:
    base = manifest.parent
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise InvalidRequestError(f"{manifest}: entry {n} has no 'path'")
        raw = row.pop("path")
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        key = row.pop("key", "") or raw
        label = row.pop("label", "") or ""
        yield GalleryEntry(key=key, path=path, label=label, attributes={k: v for k, v in row.items() if v})
