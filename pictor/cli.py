"""The ``pictor`` command: one entry point, one subcommand per job.

Each part registers its own subcommands (``register(subparsers)``) and imports its heavy
dependencies only when the subcommand runs, so the client subcommands work from the light
install and server-side ones say which extra to install.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from pictor import __version__
from pictor.config import check_environment, unknown_env_names
from pictor.errors import MissingExtraError, PictorError, notes_text, shown
from pictor.image_files import one_line

# The modules that contribute subcommands, in --help order.
_PARTS = (
    "pictor.indexer.cli",
    "pictor.server.cli",
    "pictor.client.cli",
    "pictor.trainer.cli",
    "pictor.core.cli",
)

EPILOG = """\
examples:
  pictor index sample/gallery --out index          # embed a folder of images into an index
  pictor serve --index index --port 50051          # serve it over gRPC
  pictor classify photo.jpg                        # top-5 labels
  pictor search photo.jpg -k 5                     # 5 most similar indexed images
  pictor info                                      # what the server runs

Every subcommand has its own --help. Settings also come from PICTOR_* environment
variables (PICTOR_PORT=6000) and a TOML file (--config / PICTOR_CONFIG).

exit codes: 0 success, 1 `pictor index --strict` skipped some files, 2 bad input, a request
the server refused, a write the disk refused or too little memory (the message says what), 3 a
server-side command in the light install, 4 server unreachable, busy (refused each time the call
was sent), not serving (`pictor health`; a call on an index whose folder was deleted) or no answer
within --timeout, 130 interrupted (Ctrl-C or SIGTERM; a serving `pictor serve` stops on them and
exits 0)."""


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser, without abbreviated options: `pictor add --key K` was taken as
    --key-prefix K."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # -v after the command too (`pictor serve -v`); not given there, the top level's stands
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="pictor",
        description="Image retrieval and classification: CNN embeddings, FAISS search, gRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pictor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for module in _PARTS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = "pictor"  # what messages name, once the arguments say
    # gRPC's own INFO lines (a failed TLS handshake's) would come before our message, which says
    # what went wrong and what to change; GRPC_VERBOSITY=INFO shows them again.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        # From the first moment: the subcommands' imports (gRPC, ...) take a tenth of a second,
        # and a signal then ended the process with a traceback or a bare 143.
        with _sigterm_interrupts():
            args = _parse_arguments(argv)
            command = f"pictor {args.command}"
            check_environment()
            return int(args.run(args) or 0)
    except MissingExtraError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 3
    except PictorError as e:
        # One line, as the log writes it: a path's bytes that are not UTF-8 as \xNN, its line
        # breaks as \n (a key or file name cannot forge a line of its own).
        print(one_line(f"{command}: error: {e}{notes_text(e)}"), file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `pictor models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        print(one_line(f"{command}: interrupted{notes_text(e)}"), file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"{command}: error: out of memory{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as e:
        if (isinstance(e, OSError) and e.errno in (errno.ENAMETOOLONG, errno.ELOOP)
                and isinstance(e.filename, str | bytes)):
            # A path the system cannot look up (a name over its length limit, a loop of links),
            # given as an argument or a setting: Path.exists() and the like raise for these.
            print(one_line(f"{command}: error: {shown(os.fsdecode(e.filename), 120)}: {e.strerror}"),
                  file=sys.stderr)
            return 2
        # Short of address space (ulimit -v, a container's limit), torch's libraries fail to load
        # with this (through ctypes too); a traceback through the imports said no more.
        if "failed to map segment" not in str(e):
            raise
        print(f"{command}: error: out of memory: {e} (torch's libraries take several GB of address "
              "space: see `ulimit -v` and the container's memory limit)", file=sys.stderr)
        return 2
    finally:
        if argv is None:  # the process ends now; a second Ctrl-C or SIGTERM during Python's
            # teardown (a second, with torch loaded) would turn its exit status into the signal's
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with logging set up as it asks."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse takes positionals in one run: files after an option (`pictor classify a.jpg
        # --top-k 1 b.jpg`) are left over. The subcommand's parser reads them intermixed, and
        # its usage helps more than the top level's when something is still not understood.
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        given = list(sys.argv[1:] if argv is None else argv)
        rest = given[given.index(args.command) + 1:]
        intermixed = commands.choices[args.command].parse_intermixed_args(rest)
        args = argparse.Namespace(**{**vars(args), **vars(intermixed)})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # libraries' warnings (Pillow's "Corrupt EXIF data") as log lines
    if not args.verbose:  # FAISS logs its probe for optional SIMD builds, which reads as a failure,
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        logging.getLogger("torch").setLevel(logging.WARNING)  # and torch its compile caches at exit;
        # Pillow logs and warns of each odd file it reads ("Corrupt EXIF data", an ERROR for a
        # TIFF it cannot decode), naming none: the image decodes, or is refused saying why.
        logging.getLogger("PIL").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module="PIL")
    for name in unknown_env_names(os.environ):
        logging.getLogger("pictor").warning("%s is not a Pictor setting; it is ignored", name)
    return args


class _OneLineFormatter(logging.Formatter):
    """Pictor's log lines one to a record: the file names they quote have their line breaks and
    other control characters escaped, so a name cannot split a line or forge one ("skipped
    ..."). A traceback still follows on lines of its own; other libraries' records are as they
    wrote them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.name.startswith("pictor"):
            record.message = one_line(record.message)
        return super().formatMessage(record)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`docker stop`, kill) ends a command as Ctrl-C does: with its clean-up and exit
    130. As a container's PID 1 a process has no default action for it, so a server still
    loading, or an indexer, would wait out the grace period and be killed. (`pictor serve`
    takes both signals over once it serves, to drain its calls.)"""
    if threading.current_thread() is not threading.main_thread():  # only there can it be set
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
