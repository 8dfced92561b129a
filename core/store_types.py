"""The public types of an index store: what goes in (``Item``, ``Filter``, ``SearchParams``,
``StoreOptions``), what comes out (``Hit``, ``Hits``, the results, ``StoreInfo``), and the
checks on items and labels. ``pictor.core.store`` re-exports them; this module imports nothing
from the store's other modules.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import numpy as np

from pictor.api import MAX_KEY_LEN, canonical_label, first_control_character, refuse_single
from pictor.core.spec import ModelSpec
from pictor.errors import InvalidRequestError, shown

MAX_FILTER_ATTRIBUTES = 256  # attribute pairs one search filter may require
# An item's label and attributes come back with every hit that names it: bounded, as keys are.
MAX_LABEL_LEN = MAX_KEY_LEN
MAX_ATTRIBUTES_CHARS = 65_536  # of an item's attributes, written as JSON


# -- public data types ----------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """What an indexed vector is: a user-facing key plus a label and string attributes."""

    key: str
    label: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    # sha256 of the image file the vector was embedded from (set by `pictor index` and by an
    # Upsert of image bytes), "" for a vector: `pictor index` leaves a file alone when the
    # store holds its key with this content, label and attributes.
    content_hash: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result; ``score`` is the cosine similarity (higher is closer): exact for a flat
    or HNSW index or one that re-ranks (``RFlat``), FAISS's estimate from its codes for a PQ or
    SQ index without (proto ``Hit.score`` says more)."""

    key: str
    score: float
    label: str
    attributes: Mapping[str, str]


class Hits(Sequence[Hit]):
    """One query's hits, best first, held as the metadata rows (key, label, attributes JSON
    or "") and their scores; indexing or iterating makes ``Hit`` objects.

    The search path gathers the rows with one C call and keeps them as they are: right after
    the FAISS scan has evicted the caches, an object per hit cost 31-35 us for 10 hits, and
    even regrouping the rows into columns about 10 us, the largest parts of the store's
    overhead over FAISS. The server builds its replies from the rows.
    """

    __slots__ = ("rows", "scores")

    def __init__(self, rows: Sequence[tuple[str, str, str]] = (), scores: Sequence[float] = ()) -> None:
        self.rows, self.scores = rows, scores

    @property
    def keys(self) -> list[str]:
        return [row[0] for row in self.rows]

    @property
    def labels(self) -> list[str]:
        return [row[1] for row in self.rows]

    @property
    def attributes(self) -> list[Mapping[str, str]]:
        return [_load_attrs(row[2]) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Hit: ...
    @overload
    def __getitem__(self, i: slice) -> Hits: ...
    def __getitem__(self, i: int | slice) -> Hit | Hits:
        if isinstance(i, slice):
            return Hits(self.rows[i], self.scores[i])
        key, label, text = self.rows[i]
        return Hit(key, self.scores[i], label, _load_attrs(text))

    def __iter__(self) -> Iterator[Hit]:
        for (key, label, text), score in zip(self.rows, self.scores, strict=True):
            yield Hit(key, score, label, _load_attrs(text))

    @classmethod
    def of(cls, hits: Iterable[Hit]) -> Hits:
        """``Hits`` holding ``hits`` (made elsewhere than by a search)."""
        listed = list(hits)
        return cls([(h.key, h.label, _dump_attrs(h.attributes)) for h in listed], [h.score for h in listed])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Hits | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence, like list

    def __repr__(self) -> str:
        return f"Hits({list(self)!r})"


@dataclass(frozen=True)
class Filter:
    """Restrict search to items whose label is in ``labels`` (when given) and whose
    attributes contain every pair of ``attributes``."""

    labels: Sequence[str] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        refuse_single(self.labels, "a filter's labels", "for one label, write labels=[label]")
        if not isinstance(self.attributes, Mapping):
            raise InvalidRequestError(f"a filter's attributes must be a mapping (a dict), got {shown(self.attributes)}")
        labels = tuple(self.labels)  # once: an iterator's labels would be used up by the checks
        for label in labels:
            if not isinstance(label, str):
                raise InvalidRequestError(f"a filter's labels must be strings, got {shown(label)}")
            check_label(label, "a filter")
            check_utf8(label, "a filter's label")
        if len(self.attributes) > MAX_FILTER_ATTRIBUTES:  # one INTERSECT each; SQLite allows 500 terms
            raise InvalidRequestError(f"a filter takes at most {MAX_FILTER_ATTRIBUTES} attribute pairs, "
                                      f"got {len(self.attributes)}")
        for name, value in self.attributes.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidRequestError(f"a filter's attributes must map strings to strings, got "
                                          f"{shown(name)}: {shown(value)}")
            if not name.strip():  # as checked_items refuses them
                raise InvalidRequestError(f"a filter's attribute name {name!r} is blank; no item has such an attribute")
            check_utf8(name, "a filter's attribute name")
            check_utf8(value, f"a filter's attribute {shown(name)}'s value")
        # Labels as the store keeps them (NFC), so "rosés" matches however it was typed.
        object.__setattr__(self, "labels", tuple(map(canonical_label, labels)))

    @property
    def empty(self) -> bool:
        return not self.labels and not self.attributes

    def admits(self, item: Item) -> bool:
        """Whether ``item`` is among what this filter lets through."""
        return ((not self.labels or item.label in self.labels)
                and all(item.attributes.get(name) == value for name, value in self.attributes.items()))


@dataclass(frozen=True)
class SearchParams:
    """Per-request index parameters; 0 means the store's tuned default."""

    nprobe: int = 0
    ef_search: int = 0


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    replaced: int


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    missing: list[str]


@dataclass(frozen=True)
class ItemPage:
    items: list[Item]  # in key order
    next: str  # the ``after`` of the next page; "" when this is the last


@dataclass(frozen=True)
class GetResult:
    items: list[Item]  # in the order asked, each key once
    vectors: np.ndarray | None  # [len(items), dim] float32, when asked
    missing: list[str]


@dataclass(frozen=True)
class StoreOptions:
    """Knobs of a store, fixed at creation and kept in the manifest."""

    # Memory the FAISS index of `auto` may use; decides HNSW (full vectors) vs IVF-PQ.
    memory_budget_gb: float = 4.0
    target_recall: float = 0.95  # recall@10 the tuned search defaults aim for
    exact_below: int = 100_000  # `auto` stays exact (Flat) below this many items
    growth_factor: float = 4.0  # re-train once the collection is this many times bigger
    compact_ratio: float = 0.2  # rebuild when this share of the index is tombstones
    snapshot_every: int = 20_000  # changed items between automatic snapshots
    exact_filter_limit: int = 2048  # filters matching at most this many items scan exactly
    # Keep key/label/attributes of every item in memory (~200 MB per million items) so a
    # search adds no SQLite query; False looks them up in SQLite, one query per search.
    metadata_in_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("exact_below", "snapshot_every", "exact_filter_limit", "memory_budget_gb", "target_recall",
                     "growth_factor", "compact_ratio", "metadata_in_memory"):
            value, kind = getattr(self, name), type(getattr(StoreOptions, name))  # the default's type
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise InvalidRequestError(f"StoreOptions.{name} must be {kind.__name__}, got {shown(value, 40)}")
        ranges = (
            ("memory_budget_gb", self.memory_budget_gb > 0, "above 0"),
            ("target_recall", 0 < self.target_recall <= 1, "above 0 and at most 1"),
            ("exact_below", self.exact_below >= 0, "at least 0"),
            ("growth_factor", self.growth_factor > 1, "above 1"),
            ("compact_ratio", 0 < self.compact_ratio < 1, "between 0 and 1"),
            ("snapshot_every", self.snapshot_every >= 1, "at least 1"),
            ("exact_filter_limit", self.exact_filter_limit >= 0, "at least 0"),
        )
        for name, ok, wanted in ranges:
            if not ok:
                raise InvalidRequestError(f"StoreOptions.{name} must be {wanted}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class StoreInfo:
    """What a store holds and how it searches."""

    index_type: str  # as requested: "auto" or a FAISS factory string
    factory: str  # the FAISS index in use now ("Flat" until a trained type has enough data)
    metric: str
    count: int
    dim: int
    created: str
    updated: str
    spec: ModelSpec
    tombstones: int
    snapshot_seq: int
    seq: int
    nprobe: int
    ef_search: int
    k_factor: float
    rebuilding: str = ""  # the factory a background rebuild is making ("" when none runs)


# -- attributes as stored, and checks of items ----------------------------------------------


def _load_attrs(text: str) -> Mapping[str, str]:
    return json.loads(text) if text else {}


def _dump_attrs(attrs: Mapping[str, str]) -> str:
    return json.dumps(dict(attrs), sort_keys=True, ensure_ascii=False) if attrs else ""


def check_label(label: str, whose: str) -> None:
    """Refuse a label the index cannot keep or a table cannot show (``whose`` says where it is)."""
    if len(label) > MAX_LABEL_LEN:
        raise InvalidRequestError(f"{whose}: the label is {len(label):,} characters long; at most {MAX_LABEL_LEN:,}")
    if "\0" in label:  # SQLite's JSON functions, which the label filter uses, cut text there
        raise InvalidRequestError(f"{whose}: the label {shown(label)} holds a NUL character (U+0000), "
                                  "which labels cannot")
    if control := first_control_character(label):
        # A class name is shown in tables, plots and logs: a line break there splits a row.
        raise InvalidRequestError(f"{whose}: the label {shown(label)} holds a control character "
                                  f"(U+{ord(control):04X}: a line break, tab or the like), which labels cannot")


def checked_keys(keys: Iterable[str]) -> list[str]:
    """``keys`` as a list, once each is known to be text SQLite can hold (not a number, None or
    a lone surrogate, which a non-UTF-8 file name decodes to) and no longer than a key can be."""
    refuse_single(keys, "keys", "for one key, write [key]")
    listed = list(keys)
    for key in listed:
        if not isinstance(key, str):
            raise InvalidRequestError(f"keys are text, got {shown(key)} ({type(key).__name__})")
        if len(key) > MAX_KEY_LEN:  # else "not found", as if such an item could exist
            raise InvalidRequestError(f"key {key[:60]!r}... is {len(key):,} characters long; keys take at most "
                                      f"{MAX_KEY_LEN:,}, so no item has it")
        check_utf8(key, "key")
    return listed


def check_utf8(text: str, what: str) -> None:
    """Refuse text with a lone surrogate: SQLite stores UTF-8, which cannot encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{what} {shown(text)} is not UTF-8 text ({text[e.start]!r} is half of a "
                                  "surrogate pair)") from None


def checked_items(items: list[Item]) -> list[Item]:
    """``items`` checked, with their labels as the store keeps them: in NFC
    (``canonical_label``), however the caller's text composed its accents."""
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise InvalidRequestError(f"items must be Item objects, got {type(item).__name__} {shown(item)}")
        if not isinstance(item.attributes, Mapping):
            raise InvalidRequestError(f"attributes of {shown(item.key, 200)} must map strings to strings (a dict), "
                                      f"got {type(item.attributes).__name__}")
        if not isinstance(item.key, str) or not item.key or len(item.key) > MAX_KEY_LEN:
            size = f"{len(item.key):,} characters: " if isinstance(item.key, str) and item.key else ""
            raise InvalidRequestError(
                f"item key must be a non-empty string of at most {MAX_KEY_LEN:,} characters, "
                f"got {size}{shown(item.key)}"
            )
        if not isinstance(item.label, str):
            raise InvalidRequestError(f"label of {item.key!r} must be a string")
        check_label(item.label, f"item {shown(item.key, 200)}")
        if not unicodedata.is_normalized("NFC", item.label):
            items[i] = item = replace(item, label=canonical_label(item.label))
            if len(item.label) > MAX_LABEL_LEN:  # (a few characters compose into more)
                raise InvalidRequestError(f"item {shown(item.key, 200)}: the label is {len(item.label):,} "
                                          f"characters long in Unicode NFC, as the index keeps labels; "
                                          f"at most {MAX_LABEL_LEN:,}")
        for name, value in item.attributes.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidRequestError(
                    f"attributes of {item.key!r} must map strings to strings, got "
                    f"{name!r}: {value!r}"
                )
            if not name.strip():
                raise InvalidRequestError(f"item {shown(item.key, 200)}: an attribute has a blank name {name!r} "
                                          f"(value {shown(value)}); name it, or leave it out")
        for text in (item.key, item.label, *item.attributes, *item.attributes.values()):
            check_utf8(text, f"item {shown(item.key, 200)}:")  # (a file name, a JSON escape)
        if item.attributes and len(text := _dump_attrs(item.attributes)) > MAX_ATTRIBUTES_CHARS:
            raise InvalidRequestError(f"item {shown(item.key, 200)}: its attributes take {len(text):,} "
                                      f"characters as JSON; at most {MAX_ATTRIBUTES_CHARS:,}")
    return items
