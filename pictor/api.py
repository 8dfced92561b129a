"""Typed results of the API that the server produces and the client returns (light: no torch)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from pictor.errors import InvalidRequestError

# What Classify answers with; a name's position is its ``pictor.v1.Classifier`` value.
CLASSIFIERS = ("default", "head", "knn", "all")

# The server writes an Upsert stream in chunks of this many items, each all or nothing: large
# enough to batch the forward pass, small enough that a long stream is not held in memory.
UPSERT_CHUNK = 64

# The most results one call returns: k of Search, top_k and neighbors of Classify.
MAX_K = 1000
# What a call answers with when it leaves them at 0.
DEFAULT_TOP_K = 5
DEFAULT_K = 10
DEFAULT_NEIGHBORS = 10
# The most items one List call returns (a page).
MAX_LIST = 1000
MAX_EMBED_IMAGES = 256  # per Embed call: one forward pass, bounded in time and memory
MAX_GET_KEYS = 1000  # per Get call: with vectors, 5 MB of answer at dim 1280
MAX_KEY_LEN = 4096  # characters of an item key
# The widest nprobe / efSearch a search runs with: FAISS allocates per unit of width (a
# request's efSearch of 1e8 took 0.8 GB), and past the index's size it finds nothing more.
MAX_WIDTH = 65_536


def canonical_label(label: str) -> str:
    """A label as the index keeps it, in Unicode's composed form (NFC): "rosés" typed, and
    "rosés" in a folder name that macOS wrote decomposed (e + combining accent), look alike
    and must be one class."""
    return unicodedata.normalize("NFC", label)


def first_control_character(text: str) -> str | None:
    """The first control character of ``text`` (a line break, tab, ...), Unicode's line and
    paragraph separators (U+2028, U+2029) included: what splits or garbles a table row or a
    log line. None when it has none."""
    return next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)


def request_too_large(size_bytes: int, limit_bytes: int, whose: str) -> str:
    """What is too large and what to do, for a request over ``whose`` message size limit."""
    return (f"a request of {size_bytes / 2**20:.2f} MB is over {whose} {limit_bytes / 2**20:.0f} MB limit; "
            "send less (smaller image files, fewer images, keys or items per call), or raise the limit on "
            "both sides: PICTOR_MAX_MESSAGE_MB for client commands (PictorClient(max_message_mb=...) in "
            "Python) and `pictor serve --max-message-mb`")


def reply_too_large(size_bytes: int, limit_bytes: int, whose: str, less: str) -> str:
    """What is too large and what to do, for a reply over ``whose`` message size limit; ``less``
    says how to ask for a smaller one."""
    return (f"a reply of {size_bytes / 2**20:.2f} MB is over {whose} {limit_bytes / 2**20:.0f} MB limit; ask for "
            f"{less}, or raise the limit: `pictor serve --max-message-mb` and, for the client, "
            "PICTOR_MAX_MESSAGE_MB (PictorClient(max_message_mb=...) in Python)")


def refuse_single(values: object, what: str, hint: str) -> None:
    """Refuse a lone value where a list is expected: a str or bytes would be iterated as its
    characters (or byte values), keys, labels or numbers one by one; anything else that is not
    iterable (a number, one UpsertItem) would fail with Python's own words."""
    if isinstance(values, str | bytes | bytearray | memoryview) or not isinstance(values, Iterable):
        raise InvalidRequestError(f"{what} must be a list, got a single {type(values).__name__}; "
                                  f"{hint}")


@dataclass(frozen=True)
class ServerInfo:
    """What a server runs; the fields of ``pictor.v1.InfoResponse``."""

    backbone: str
    weights: str
    embedding_dim: int
    index_size: int
    index_type: str  # requested type, with the FAISS index in use: "auto (Flat)"
    metric: str
    classifier: str  # "head", "imagenet" or "knn" (what a default Classify uses)
    class_names: list[str]
    server_version: str
    versions: dict[str, str]
    open_set: str = ""  # "", "on: <rule>", or "class fit alone: <why>; <rule>" (see the proto)
    finetune: str = ""  # fingerprint of the fine-tuned backbone; "" = the weights as they came
    pooling: str = ""  # "avg", "max" or "gem" (see the proto)
    layer: str = ""  # "" = the backbone's last feature layer
    label_counts: dict[str, int] = field(default_factory=dict)  # items per label ("" = unlabelled)
    whitening: str = ""  # "pca<dim>:<fingerprint>" of a PCA-whitened index (see the proto), else ""
    model_sha256: str = ""  # of the --model file served (read at start or the last SIGHUP), else ""


@dataclass(frozen=True)
class OpenSetCheck:
    """What a model's open-set rule measured for one image (``pictor.v1.OpenSetCheck``)."""

    class_fit: float
    nearest_similarity: float | None  # None: no comparable neighbour; the class fit decided alone
    reason: str = ""  # why the image is "unknown", with figures and thresholds; "" when known

    @property
    def unknown(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class StoredItem:
    """An indexed item as ``Get`` returns it: its vector only when asked for."""

    key: str
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    vector: list[float] | None = None
