"""A backbone's official weights in torch hub's and Hugging Face's caches: found there, or
downloaded (with short timeouts) only when missing and the network answers; else an error
that says how to provide them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import socket
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from pictor.config import DEFAULT_BACKBONE, offline
from pictor.core._backbone_checkpoints import first_line
from pictor.core.files import why_not_tensors, write_atomic
from pictor.errors import InvalidRequestError, WeightsUnavailableError

if TYPE_CHECKING:
    from pictor.core.backbones import BackboneInfo

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 3.0  # reachability probe: fail fast when offline
_DOWNLOAD_TIMEOUT_S = 30.0  # per socket read while downloading


@contextlib.contextmanager
def damaged_cache_named(path: Path) -> Iterator[None]:
    """A cached weights file that is there but does not load (cut short by a killed download)."""
    try:
        yield
    except InvalidRequestError as e:  # read as a local checkpoint, which names the file
        raise WeightsUnavailableError(
            f"the cached weights file does not load: {e}; delete it so it is fetched again, or "
            "put a good copy there") from e
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        # skip=1: torch's first line only says "Error(s) in loading state_dict for ResNet:"
        why = why_not_tensors(path, e) if isinstance(e, pickle.UnpicklingError) else first_line(e, skip=1)
        raise WeightsUnavailableError(
            f"the cached weights file {path} does not load ({why}); delete it so it is fetched "
            "again, or put a good copy there"
        ) from e


def tv_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _timm_hf_files(cfg: Any) -> tuple[str, tuple[str, ...]] | None:
    """The Hugging Face repository of a timm weights tag and the files that may hold the
    weights, in timm's order: the one the tag names, else safetensors before the pickle."""
    if not cfg.hf_hub_id:
        return None
    return cfg.hf_hub_id, tuple(dict.fromkeys((cfg.hf_hub_filename or "model.safetensors",
                                               "model.safetensors", "pytorch_model.bin")))


def timm_cached_file(cfg: Any) -> Path | None:
    hf = _timm_hf_files(cfg)
    if hf is None:
        path = tv_cache_path(cfg.url)
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in hf[1]:
        found = try_to_load_from_cache(hf[0], filename)
        if isinstance(found, str):
            return Path(found)
    return None


def timm_ensure_file(info: BackboneInfo, cfg: Any) -> Path:
    cached = timm_cached_file(cfg)
    if cached is not None:
        return cached
    hf = _timm_hf_files(cfg)
    if hf is None:
        path = tv_cache_path(cfg.url)
        ensure_cached(cfg.url, path, info, cfg.tag)
        return path
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, filenames = hf
    endpoint = constants.ENDPOINT
    where = f"{repo} ({' or '.join(filenames)}) in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if why := _why_no_download(endpoint, hub_offline=constants.HF_HUB_OFFLINE):
        raise _unavailable(info, cfg.tag, where, why)
    log.info("downloading %s weights %s from %s", info.name, cfg.tag, endpoint)
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, etag_timeout=_CONNECT_TIMEOUT_S))
        except EntryNotFoundError:  # not in this repository: the next name, as timm does
            continue
        except Exception as e:  # noqa: BLE001 - any hub/network failure means "unavailable"
            raise _unavailable(info, cfg.tag, where, f"the download failed: {e}") from e
    raise _unavailable(info, cfg.tag, where, "the repository has none of them")


def ensure_cached(url: str, dest: Path, info: BackboneInfo, tag: str) -> None:
    """Make sure ``url`` sits at ``dest`` (torch hub's cache), or fail fast."""
    if dest.is_file():
        return
    if why := _why_no_download(url):
        raise _unavailable(info, tag, str(dest), why)
    log.info("downloading %s weights %s from %s", info.name, tag, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, dest)
    except (OSError, ValueError) as e:
        raise _unavailable(info, tag, str(dest), f"the download failed: {e}") from e


@cache
def _reachable(url: str) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within a few seconds."""
    p = urlparse(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    try:
        with socket.create_connection((p.hostname or "", port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _unavailable(info: BackboneInfo, tag: str, where: str, why: str) -> WeightsUnavailableError:
    copy = ("copying the file to that place (Hugging Face's cache wants its own layout: best "
            "filled by a run with network access)" if info.source == "timm" else "copying the file there")
    return WeightsUnavailableError(
        f"weights {tag!r} for backbone {info.name} are not cached ({where}) and {why}. Provide "
        f"them by: running once with network access (they are cached), or {copy}",
        f"; or pass --weights PATH (a checkpoint), or use --weights random (untrained) or the "
        f"offline backbone '{DEFAULT_BACKBONE}'")


def _why_no_download(url: str, hub_offline: bool = False) -> str | None:
    """Why weights cannot be downloaded from ``url`` now, or None when they can be tried."""
    if offline():
        return "downloads are off (PICTOR_OFFLINE)"
    if hub_offline:
        return "downloads are off (HF_HUB_OFFLINE)"
    if not _reachable(url):
        return f"{urlparse(url).scheme}://{urlparse(url).hostname} cannot be reached"
    return None


def _download(url: str, dest: Path) -> None:
    # torch hub names files <name>-<sha256 prefix>.pth; check it like torch.hub does.
    prefix = torch.hub.HASH_REGEX.search(dest.name)

    def fetch(out: IO[bytes]) -> None:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                h.update(block)
        if prefix and not h.hexdigest().startswith(prefix.group(1)):
            raise ValueError(f"sha256 of {url} does not start with {prefix.group(1)}")

    write_atomic(dest, fetch, durable=False)  # a failed or wrong download leaves nothing behind
