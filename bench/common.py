"""What every bench shares: an argument parser whose ``--help`` shows the module docstring
and each option's default, the machine line a bench prints first (figures recorded in
docs/benchmarks.md say which machine they come from), and a real server over the sample
gallery for the benches that call one."""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from pictor.config import ClientTLS

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each option's help (unless empty or off); the docstring's layout
    (formulas, the command to run) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def machine_line(device: str = "auto") -> str:
    """CPU model, cores, vector extensions, library versions and the device, in one line."""
    import faiss
    import torch

    from pictor.core.embedder import cpu_has_fast_bf16, resolve_device

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
            f"native bf16 (AMX/AVX512-BF16): {'yes' if cpu_has_fast_bf16() else 'no'}, "
            f"faiss {faiss.__version__}, device {resolve_device(device)}")


def encoded(im: Image.Image, fmt: str, **kw: object) -> bytes:
    """``im`` as a file of ``fmt`` (Pillow's save options in ``kw``)."""
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pictor(*args: object) -> str:
    """Run a `pictor` command to its end (without progress bars) and return its stdout; a
    failure ends the bench with the command's stderr."""
    done = subprocess.run([sys.executable, "-m", "pictor.cli", *map(str, args), "--no-progress"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pictor {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(folder: Path, serve_args: Sequence[str] = (), index: Path | None = None,
           tls: ClientTLS | bool = False) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A real ``pictor serve`` over ``index`` (default: the sample gallery, indexed into
    ``folder/index``), its log in ``folder/server.log``; yields (target, process, index) once it
    answers health checks (called with ``tls``, as its ``serve_args`` need), and stops it (if
    still running) on the way out."""
    from pictor.client import PictorClient
    from pictor.errors import PictorError

    if index is None:
        index = folder / "index"
        pictor("index", SAMPLE / "gallery", "--out", index)
    port = free_port()
    with open(folder / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "pictor.cli", "serve", "--index", str(index),
                                   "--port", str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT)
    target = f"localhost:{port}"
    try:
        with PictorClient(target, timeout=30, tls=tls) as client:
            for _ in range(600):
                try:
                    client.health()
                    break
                except PictorError:
                    if server.poll() is not None:
                        raise RuntimeError(f"pictor serve exited with {server.returncode}: see its log, "
                                           f"{folder / 'server.log'}") from None
                    time.sleep(0.5)
        yield target, server, index
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(60)
