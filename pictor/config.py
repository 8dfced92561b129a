"""Typed configuration: one frozen object per process, built in ``main()``.

Precedence, highest first: command-line flags, environment variables ``PICTOR_<FIELD>``
(for example ``PICTOR_PORT=6000``), a TOML file (``--config FILE`` or ``PICTOR_CONFIG``),
then the defaults written here. Every default works on a laptop with no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pictor.errors import InvalidRequestError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_PORT = 50051
DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 30.0  # seconds a client call may take
# Pixels an image may decode to (JPEGs count at their drafted size, so a 48 MP phone photo
# passes): a large photo passes, a decompression bomb does not.
DEFAULT_MAX_PIXELS = 40_000_000
# gRPC message size limits, server and client alike; gRPC takes them as int32 bytes.
DEFAULT_MAX_MESSAGE_MB, MAX_MESSAGE_MB = 64, 2047
POOLINGS = ("avg", "max", "gem")  # of the backbone's feature map
MAX_IDLE_TIMEOUT = 7 * 24 * 3600  # seconds, for --upsert-idle-timeout
MAX_QUEUE_DELAY_MS = 1000  # for serve --max-queue-delay-ms: a call held a second for others is a typo
MAX_TOKEN_CHARS = 4096  # well under gRPC's 8 KB of headers
SECRET_SETTINGS = frozenset({"token"})  # values no message repeats
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Upper bounds on sizes that cost memory per unit: a typo (--batch-size 100000) is refused
# with a message, not answered by running out of memory after the model has loaded.
MAX_BATCH_SIZE = 4096  # images per forward pass; the indexer holds two batches decoded
MAX_SERVER_WORKERS = 1024  # gRPC handler threads, each may hold a decoded image
MAX_DECODE_WORKERS = 256  # the indexer's decode threads


def default_cache_dir() -> Path:
    """``$PICTOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/pictor``, else ``~/.cache/pictor``."""
    if os.environ.get("PICTOR_CACHE_DIR"):
        return Path(os.environ["PICTOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pictor"


def cache_root(cache_dir: str | os.PathLike[str]) -> Path | None:
    """The cache a ``--cache-dir`` value names: ``""`` the default, ``"none"`` no cache."""
    if str(cache_dir).lower() == "none":
        return None
    return Path(cache_dir) if cache_dir else default_cache_dir()


@dataclass(frozen=True)
class RuntimeSettings:
    """How the network runs here, and which images it takes: what serving and embedding share."""

    # "" = the backbone's default weights; or a tag, a checkpoint path, "random". An index or
    # model file built from a checkpoint keeps only its hash: this names the file again.
    weights: str = ""
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    compile: bool = False  # torch.compile the backbone: a slow first batch, faster after
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _check_positive(self, "max_pixels")
        # Checked here, not only where the model loads: an error then names the flag, variable or file.
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise SettingValueError("device", "auto, cpu, cuda or cuda:N", repr(self.device))
        if self.precision not in PRECISIONS:
            raise SettingValueError("precision", f"one of {', '.join(PRECISIONS)}", repr(self.precision))


@dataclass(frozen=True)
class ModelSettings(RuntimeSettings):
    """Which network embeds images, and how it runs."""

    # "" = not set: an index's or a model file's own, else the default (efficientnet_lite0, avg).
    # A value set, even the default's, must agree with an index or model file.
    backbone: str = ""
    pooling: str = ""
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_between(self, "batch_size", 1, MAX_BATCH_SIZE)
        if self.pooling not in ("", *POOLINGS):
            raise SettingValueError("pooling", f"one of {', '.join(POOLINGS)}", repr(self.pooling))

    def disagreement(self, backbone: str, pooling: str) -> str:
        """The backbone and pooling set here that differ from an index's or a model file's
        (``"backbone resnet50 and pooling max"``), or "" when they agree or are not set."""
        return " and ".join(f"{name} {mine}{f' ({where})' if (where := set_by(self, name)) else ''}"
                            for name, mine, theirs in
                            (("backbone", self.backbone, backbone), ("pooling", self.pooling, pooling))
                            if mine and mine != theirs)


@dataclass(frozen=True)
class ServerSettings(RuntimeSettings):
    """What ``pictor serve`` reads: the index, the optional model file, and the server."""

    index: str = "index"  # store directory written by `pictor index`
    model: str = ""  # optional fine-tuned model file (`pictor train`)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 8  # gRPC handler threads
    # Most images in one forward pass: the calls waiting for the model share one. Not the
    # indexer's 32: on a 2-core CPU passes of 8 ran 1.6x faster per image than of 32 (bench/batching.py).
    batch_size: int = 8
    # Milliseconds a pass that is not full waits for more calls, from its oldest call's coming
    # (Triton's max queue delay). 0: none; for a GPU (on 2 CPU cores 5-20 ms gained nothing).
    max_queue_delay_ms: float = 0.0
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    # Seconds an Upsert or reflection stream may send nothing before the server ends it (a quiet
    # client without a deadline would otherwise hold a stream slot for good).
    upsert_idle_timeout: float = 60.0
    metrics_port: int = 0  # Prometheus metrics over HTTP on this port, same host (0: none)
    # Calls must carry it ("authorization: Bearer TOKEN"), health checks excepted ("": none).
    token: str = dataclasses.field(default="", repr=False)  # one of SECRET_SETTINGS
    # TLS: the server's certificate chain and its private key (PEM files; "": plain TCP), and with
    # tls_client_ca, the CA whose certificates clients must present (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls_cert and not self.tls_key:
            raise SettingValueError("tls_cert", "given with tls_key (the certificate's private key)", "no tls_key")
        if self.tls_key and not self.tls_cert:
            raise SettingValueError("tls_key", "given with tls_cert (the certificate it is the key of)", "no tls_cert")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingValueError("tls_client_ca", "given with tls_cert and tls_key (mutual TLS is TLS: the server "
                                    "shows its own certificate too)", "no tls_cert")
        if not 0 < self.upsert_idle_timeout <= MAX_IDLE_TIMEOUT:  # nan and inf too; Python waits 9.2e9 s at most
            raise SettingValueError("upsert_idle_timeout", f"a number of seconds above 0, at most {MAX_IDLE_TIMEOUT} "
                                    "(a week)", self.upsert_idle_timeout)
        if not self.index:  # Path("") is the current folder
            raise SettingValueError("index", "the index's folder", "'' (empty)")
        if not 0 <= self.port <= 65535:
            raise SettingValueError("port", "between 0 (any free port) and 65535", self.port)
        if not 0 <= self.metrics_port <= 65535:
            raise SettingValueError("metrics_port", "between 1 and 65535, or 0 for no metrics", self.metrics_port)
        if self.metrics_port and self.metrics_port == self.port:
            raise SettingValueError("metrics_port", f"another port than the gRPC port {self.port}", self.metrics_port)
        if not 2 <= self.workers <= MAX_SERVER_WORKERS:  # an Upsert stream holds one while its client sends
            raise SettingValueError("workers", f"at least 2 (one is always kept for health checks and lookups) and "
                                    f"at most {MAX_SERVER_WORKERS}", self.workers)
        _check_between(self, "batch_size", 1, MAX_BATCH_SIZE)
        if not 0 <= self.max_queue_delay_ms <= MAX_QUEUE_DELAY_MS:  # nan too
            raise SettingValueError("max_queue_delay_ms", f"between 0 and {MAX_QUEUE_DELAY_MS} milliseconds",
                                    self.max_queue_delay_ms)
        check_max_message_mb(self.max_message_mb)
        if self.token:
            check_token(self.token)


@dataclass(frozen=True)
class ClientTLS:
    """How a client calls a server over TLS: PEM files ("": not given). The client commands
    read them from ``PICTOR_TLS_*`` (``default_tls``)."""

    ca: str = ""  # the CA certificates the server's must be signed by ("": the system's trusted ones)
    cert: str = ""  # this client's certificate chain, for a server that asks for one (mutual TLS)
    key: str = ""  # its private key
    server_name: str = ""  # the name the server's certificate must be for ("": the target's host)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidRequestError("a client certificate needs its private key and a key its certificate: give "
                                      f"both or neither (got {'cert' if self.cert else 'key'} only)")


@dataclass(frozen=True)
class IndexerSettings:
    gallery: str = ""
    out: str = "index"
    index_type: str = "auto"  # a FAISS factory string ("Flat", "HNSW32", "IVF1024,PQ32") or "auto"
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    # A `pictor train` model file: embed with its (fine-tuned) backbone. Named `model` in files
    # and the environment, like the server's, so one file serves both commands.
    model_file: str = dataclasses.field(default="", metadata={"name": "model"})
    workers: int = 2  # decode threads
    labels: str = "folder"  # "folder" (top-level folder name), "none"; a manifest brings its own
    pca_whiten: int = 0  # PCA-whitening to this many dims, fitted on a gallery sample (0 = off)
    pca_sample: int = 10_000  # gallery images embedded to fit it (embedded again when indexed)

    def __post_init__(self) -> None:
        _check_positive(self, "pca_sample")
        _check_between(self, "workers", 1, MAX_DECODE_WORKERS)
        if self.labels not in ("folder", "none"):
            raise SettingValueError("labels", "folder or none", repr(self.labels))
        if not self.out:  # Path("") is the current folder
            raise SettingValueError("out", "the index's folder", "'' (empty)")
        if self.pca_whiten < 0:
            raise SettingValueError("pca_whiten", "0 (off) or a number of dims", self.pca_whiten)


def whole_number(text: str) -> int:
    """The argparse type of a whole-number flag: int() but for "1_000" (a typo more often than meant)."""
    return _flag_number(text, int, "a whole number")


def number(text: str) -> float:
    """The argparse type of a number flag: float() but for "0.000_1"."""
    return _flag_number(text, float, "a number")


def _flag_number(text: str, typ: type[int] | type[float], what: str) -> Any:
    try:
        return _parse_text(text, typ, "")
    except InvalidRequestError:  # (argparse's usage error, as for a flag's other mistakes)
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


# The flags that set how the model runs (and --config), each declared once: a command adds those
# it takes with add_flag. A flag's dest is its setting's name, which build_settings reads, and it
# has no default: a flag not given is None, so the environment and the file still count.
FLAGS: dict[str, dict[str, Any]] = {
    "backbone": {"help": f"backbone name (default {DEFAULT_BACKBONE}; see `pictor models`)"},
    "weights": {"help": "weights tag, local checkpoint path, or 'random' (default: the backbone's default)"},
    "device": {"help": "auto (default), cpu, cuda, cuda:N"},
    "precision": {"choices": PRECISIONS,
                  "help": "numeric precision of the model (default auto: the precision an existing index or model "
                          "file was made at where the hardware runs it fast, else bf16 where it does, else fp32)"},
    "compile": {"action": argparse.BooleanOptionalAction, "default": None,
                "help": "torch.compile the backbone: its first batch compiles (seconds to a minute), later "
                        "forward passes run 1.1-1.6x faster on a CPU; a 2-core `pictor index` gains little, "
                        "its decoding shares the cores (docs/benchmarks.md)"},
    "pooling": {"choices": POOLINGS, "help": "global pooling of the feature map (default avg)"},
    "batch_size": {"type": whole_number,
                   "help": f"images per forward pass (default {ModelSettings.batch_size}, at most {MAX_BATCH_SIZE})"},
    "max_pixels": {"type": whole_number, "metavar": "N",
                   "help": f"largest image decoded, in pixels (default {DEFAULT_MAX_PIXELS}; a JPEG counts at "
                           "the reduced size it is decoded at, 1/8 for a big photo, but a progressive one in full, as "
                           "its decoder holds all of it; PNG, WebP and others in full)"},
    "config": {"help": "TOML file with settings (flags and PICTOR_* env override it)"},
}


def add_flag(parser: argparse.ArgumentParser, name: str, *, help_end: str = "", **kwargs: Any) -> None:
    """Add the flag of setting ``name`` (``max_pixels``: ``--max-pixels N``) to a command's parser,
    as ``FLAGS`` declares it. ``help_end`` goes after the shared help ("; ..."); ``kwargs`` replace
    what a command's flag says differently (``help=``, ``metavar=``, ``choices=``)."""
    spec = {**FLAGS[name], **kwargs}
    if help_end:
        spec["help"] += f"; {help_end}"
    parser.add_argument(f"--{name.replace('_', '-')}", **spec)


def show_progress(no_progress: bool) -> bool:
    """Progress bars for a person at a terminal, unless ``--no-progress``; not into logs."""
    return not no_progress and sys.stderr.isatty()


class SettingValueError(InvalidRequestError):
    """A setting's value out of its range; ``build_settings`` says where it was set."""

    def __init__(self, setting: str, allowed: str, value: object) -> None:
        super().__init__(f"{setting} must be {allowed}, got {value}")
        self.setting = setting

    def set_by(self, source: str) -> InvalidRequestError:
        """This error, naming the flag, variable or file that set the value."""
        return InvalidRequestError(f"{self} (from {source})")


def check_token(token: str) -> None:
    """A token travels as a gRPC header: visible ASCII, no spaces. Its value is never said."""
    if not isinstance(token, str):
        raise SettingValueError("token", "text", f"a {type(token).__name__}")
    bad = next((i for i, c in enumerate(token) if not "!" <= c <= "~"), None)
    if bad is not None or not 0 < len(token) <= MAX_TOKEN_CHARS:
        said = f"{len(token)} character{'' if len(token) == 1 else 's'}"
        if bad is not None:
            said += f", of which character {bad + 1} is a space, a control character or not ASCII"
        if token.lower().startswith("bearer "):
            said += " (give the token alone, without 'Bearer ')"
        raise SettingValueError(
            "token", f"1 to {MAX_TOKEN_CHARS} visible ASCII characters without spaces (it is sent as a gRPC header)",
            said)


def check_max_message_mb(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingValueError("max_message_mb", f"a whole number between 1 and {MAX_MESSAGE_MB}", repr(value))
    if not 1 <= value <= MAX_MESSAGE_MB:
        raise SettingValueError("max_message_mb", f"between 1 and {MAX_MESSAGE_MB}", value)


def _check_positive(settings: object, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise SettingValueError(name, "at least 1", getattr(settings, name))


def _check_between(settings: object, name: str, low: int, high: int) -> None:
    if not low <= getattr(settings, name) <= high:
        raise SettingValueError(name, f"between {low} and {high}", getattr(settings, name))


S = TypeVar("S")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _coerce(value: Any, typ: Any, name: str, where: str = "") -> Any:
    """``value`` (a flag, env string or TOML value) as ``typ``, or a clear error naming where it
    came from (``name``: the setting, ``PICTOR_*`` variable or flag; ``where``: " in the config
    file"). A file's value must have TOML's own type (``port = 6000``, ``compile = true``): text
    is read as a number or a yes/no only from flags and variables, which are text."""
    secret = name.lower().removeprefix("pictor_").removeprefix("--").replace("-", "_") in SECRET_SETTINGS
    invalid = f"setting {name}{'' if secret else f'={value!r}'}{where} is not a valid {typ.__name__}"
    if isinstance(value, str) and typ is not str and not where:
        return _parse_text(value, typ, invalid)
    if typ is float and type(value) is int:
        return float(value)
    if type(value) is not typ:  # port = 1.5, workers = true, port = "6000" are mistakes
        quotes = ("; write it without quotes" if isinstance(value, str)
                  else "; write it in quotes" if typ is str and isinstance(value, int | float) else "")
        raise InvalidRequestError(invalid + (" (true or false)" if typ is bool else "") + quotes)
    return value


def _parse_text(text: str, typ: Any, invalid: str) -> Any:
    """A flag's or variable's text as ``typ`` (int, float or bool)."""
    if typ is bool:
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise InvalidRequestError(f"{invalid} ({', '.join(_TRUE)} or {', '.join(_FALSE[:-1])})")
        return word in _TRUE
    if "_" in text:  # int() and float() read "1_000" as 1000: a typo more often than meant
        raise InvalidRequestError(invalid)
    try:
        return typ(text)
    except ValueError as e:
        raise InvalidRequestError(invalid) from e


def build_settings(
    cls: type[S],
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> S:
    """Build ``cls`` from defaults < TOML file < ``PICTOR_*`` env < flags (``None`` = unset).

    A nested settings field (``IndexerSettings.model``) reads the same flags, env and file
    names: the file is flat, so one name means one thing for every command.
    """
    env = os.environ if env is None else env
    if file_values is None:
        file_values = _read_config_file(env.get("PICTOR_CONFIG") if config_file is None else config_file)
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for range errors
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            values[f.name] = build_settings(typ, flags, env=env, file_values=file_values)  # type: ignore[arg-type]
            continue
        name = _setting_name(f)
        value, source = _lookup(f.name, name, flags, env, file_values)
        if value is not dataclasses.MISSING:
            in_file = " in the config file" if source == name else ""
            values[f.name] = _coerce(value, typ, source, in_file)
            sources[f.name] = source + in_file
    try:
        settings = cls(**values)
    except SettingValueError as e:
        if e.setting in sources:
            raise e.set_by(sources[e.setting]) from None
        raise
    object.__setattr__(settings, "_sources", sources)  # for set_by (frozen: a field would be a setting)
    return settings


def set_by(settings: object, field: str) -> str:
    """Where a setting of ``settings`` (made by ``build_settings``) was set, for a message:
    ``--pooling``, ``PICTOR_POOLING`` or ``pooling in the config file``; "" for a default."""
    sources: dict[str, str] = getattr(settings, "_sources", {})
    return sources.get(field, "")


def _lookup(field: str, name: str, flags: Mapping[str, Any], env: Mapping[str, str],
            file_values: Mapping[str, Any]) -> tuple[Any, str]:
    """A setting's value (MISSING when not set) and where it came from: its flag, its
    ``PICTOR_*`` variable or its ``name`` in the file (``field``: the settings field and flag)."""
    value, source = file_values.get(name, dataclasses.MISSING), name
    if env.get(f"PICTOR_{name.upper()}"):  # set and not empty (compose passes unset ones as "")
        value, source = env[f"PICTOR_{name.upper()}"], f"PICTOR_{name.upper()}"
    if flags.get(field) is not None:
        value, source = flags[field], f"--{field.replace('_', '-')}"
    return value, source


def model_settings(flags: Mapping[str, Any], config_file: str | None = None) -> ModelSettings:
    """The model settings as ``pictor index`` reads them, for commands with no settings class
    of their own (``train``, ``eval``): one file or environment sets the backbone for all."""
    return build_settings(ModelSettings, flags, config_file=config_file)


# PICTOR_* variables read outside the settings classes (by the functions below), and by
# docker-compose.yml (BIND), which a shell that runs compose exports for every command.
# What each field of ClientTLS is read from, for the client commands.
_CLIENT_TLS_ENV = {"ca": "PICTOR_TLS_CA", "cert": "PICTOR_TLS_CLIENT_CERT", "key": "PICTOR_TLS_CLIENT_KEY",
                   "server_name": "PICTOR_TLS_SERVER_NAME"}
_OTHER_ENV = ("CONFIG", "TARGET", "OFFLINE", "CACHE_DIR", "BIND", "TLS",
              *(name.removeprefix("PICTOR_") for name in _CLIENT_TLS_ENV.values()))


def default_token() -> str | None:
    """The token client commands send: ``$PICTOR_TOKEN``, the variable the server reads for its
    own, or none."""
    token = os.environ.get("PICTOR_TOKEN") or None
    if token is not None:
        try:
            check_token(token)
        except SettingValueError as e:
            raise e.set_by("PICTOR_TOKEN") from None
    return token


def default_tls() -> ClientTLS | None:
    """How client commands reach the server: over TLS when ``PICTOR_TLS`` is true or a
    ``PICTOR_TLS_CA``, ``PICTOR_TLS_CLIENT_CERT`` and ``_KEY`` or ``PICTOR_TLS_SERVER_NAME`` is
    set (their files are read when the client is made), else in plain TCP (None)."""
    values = {field: os.environ.get(name, "") for field, name in _CLIENT_TLS_ENV.items()}
    switch = os.environ.get("PICTOR_TLS", "")
    given = [_CLIENT_TLS_ENV[field] for field, value in values.items() if value]
    if switch and not _coerce(switch, bool, "PICTOR_TLS"):
        if given:
            raise InvalidRequestError(f"PICTOR_TLS={switch} turns TLS off, but {' and '.join(given)} "
                                      "set TLS up: unset one or the other")
        return None
    if not switch and not given:
        return None
    try:
        return ClientTLS(**values)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{e} (from PICTOR_TLS_CLIENT_CERT and PICTOR_TLS_CLIENT_KEY)") from None


def default_target() -> str:
    """The server client commands call without ``--target``: ``$PICTOR_TARGET`` or localhost."""
    return os.environ.get("PICTOR_TARGET") or DEFAULT_TARGET


def client_max_message_mb() -> int:
    """The message size limit of client commands: ``$PICTOR_MAX_MESSAGE_MB``, the variable the
    server reads for its own, or 64."""
    raw = os.environ.get("PICTOR_MAX_MESSAGE_MB", "")
    if not raw:
        return DEFAULT_MAX_MESSAGE_MB
    value: int = _coerce(raw, int, "PICTOR_MAX_MESSAGE_MB")
    try:
        check_max_message_mb(value)
    except SettingValueError as e:
        raise e.set_by("PICTOR_MAX_MESSAGE_MB") from None
    return value


def offline() -> bool:
    """``PICTOR_OFFLINE=1``: never try to download weights, even when the network answers."""
    return bool(_coerce(os.environ.get("PICTOR_OFFLINE", ""), bool, "PICTOR_OFFLINE"))


def check_environment() -> None:
    """Refuse a ``PICTOR_*`` value that no command could use (``PICTOR_BATCH_SIZE=0``,
    ``PICTOR_OFFLINE=maybe``) whichever command runs: one environment serves every command
    (compose), and a value one command does not read would wait to fail in another. Only the
    model's settings and these variables: they mean the same to every command, where
    ``PICTOR_WORKERS`` does not (the server's threads, the indexer's decoders)."""
    build_settings(ModelSettings, file_values={})
    offline()
    default_tls()
    client_max_message_mb()


def unknown_env_names(env: Mapping[str, str]) -> list[str]:
    """``PICTOR_*`` variables that no command reads: typos (``PICTOR_PROT``) that would be ignored."""
    known = {f"PICTOR_{n.upper()}" for n in (*_OTHER_ENV, *_setting_types())}
    return sorted(n for n in env if n.startswith("PICTOR_") and n not in known)


def _setting_name(f: dataclasses.Field[Any]) -> str:
    """The name a field has in files and ``PICTOR_*`` variables (flags use the field's own)."""
    return str(f.metadata.get("name", f.name))


def _setting_types() -> dict[str, Any]:
    """Each name a file or a ``PICTOR_*`` variable may set, and its type (one in every class):
    one file (and one environment) serves every command, so a name is known when any settings
    class has it."""
    types: dict[str, Any] = {}
    for cls in (ServerSettings, IndexerSettings, ModelSettings):
        hints = typing.get_type_hints(cls)
        types |= {_setting_name(f): hints[f.name] for f in dataclasses.fields(cls)
                  if not dataclasses.is_dataclass(hints[f.name])}
    return types


def _read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    try:
        if p.exists() and not (p.is_file() or p.is_dir()):  # a FIFO would block the reader for ever
            raise InvalidRequestError(f"config file {p} is not a regular file (a FIFO, socket or device)")
        values = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write
    except FileNotFoundError:
        raise InvalidRequestError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"config file {p} is a directory, not a file") from None
    except OSError as e:
        raise InvalidRequestError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise InvalidRequestError(f"config file {p} is not UTF-8 text (byte {e.start}), as TOML must be") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequestError(f"config file {p} is not valid TOML: {e}") from e
    _check_names(values, p)
    # Every value's type, and the model settings' ranges, whichever command reads the file: a
    # mistake in a setting of `serve` would otherwise pass `index` and stop the server later.
    types = _setting_types()
    for name, value in values.items():
        _coerce(value, types[name], name, " in the config file")
    build_settings(ModelSettings, env={}, file_values=values)
    return values


def _check_names(values: Mapping[str, Any], path: Path) -> None:
    """Refuse names no command reads (a typo such as ``prot = 6000`` would be ignored), and
    tables: the file is flat."""
    known = _setting_types()
    for name, value in values.items():
        if isinstance(value, dict):
            raise InvalidRequestError(f"config file {path}: a table [{name}], but the file is flat: write "
                                      "each setting at the top, before any [table]")
        if name not in known:
            raise InvalidRequestError(
                f"config file {path}: unknown setting {name!r}; valid names: {', '.join(sorted(known))}")
