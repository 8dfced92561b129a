"""Shared fixtures: tiny images drawn here, free ports, a real server subprocess."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pictor.client import UpsertItem

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def drawn_image(seed: int, size: int = 96, fmt: str = "PNG") -> bytes:
    """A distinct picture per seed: coloured shapes on a coloured background."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    im = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        x1, y1 = x0 + rng.randrange(10, size // 2), y0 + rng.randrange(10, size // 2)
        shape = rng.choice([draw.rectangle, draw.ellipse])
        shape([x0, y0, x1, y1], fill=colour())
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def make_gallery(root: Path) -> Path:
    """12 drawn images in two label folders."""
    for i in range(12):
        folder = root / ("warm" if i % 2 else "cool")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}.png").write_bytes(drawn_image(i))
    return root


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    return make_gallery(tmp_path / "gallery")


def unlistable(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Make ``folders`` fail to list as a folder without read permission does (root, which
    runs CI, ignores the permission bits)."""
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) in folders:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def dead_pid() -> int:
    """The id of a process that has ended (as a writer killed since)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def held_open(key: str, release: threading.Event, sent: threading.Event | None = None) -> Iterator[UpsertItem]:
    """Upsert items that send one item, then hold the stream open until ``release`` (``sent`` is
    set once the client has taken the item)."""
    yield UpsertItem(key=key, vector=[1.0] * 1280)
    if sent is not None:
        sent.set()
    release.wait(30)


def wait_until(done: Callable[[], object], timeout: float = 60, poll: float = 0.05) -> None:
    """Poll ``done()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"still not done after {timeout:.0f} s"
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pictor(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `pictor` command (the installed entry point's module) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pictor.cli", *args],
        capture_output=True, text=True, check=check, cwd=cwd, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class ServerProcess:
    """`pictor serve` as a real subprocess, on the port it binds itself (``--port 0``: a free
    port picked here could be taken before the server binds it), as its log says."""

    def __init__(self, index: Path, *extra: str) -> None:
        self.index, self.extra = index, extra
        self.port, self.target = 0, ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "a", dir=self.index.parent, prefix="server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pictor.cli", "serve", "--index", str(self.index), "--port", "0", *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            if serving := re.search(r" serving \S+ on 127\.0\.0\.1:(\d+) ", self.read_log()):
                self.port = int(serving[1])
                self.target = f"127.0.0.1:{self.port}"
                return self
            time.sleep(0.1)
        raise TimeoutError(f"server did not start serving: {self.read_log()}")

    def read_log(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # (seen once on a loaded machine): what was it doing?
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server did not stop within 60 s of SIGTERM; its log:\n{self.read_log()}") from None
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def built_index(gallery: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out), "--no-progress")
    return out


@pytest.fixture(scope="module")
def shared_gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery for a whole test module; tests must not change it."""
    return make_gallery(tmp_path_factory.mktemp("shared") / "gallery")


@pytest.fixture(scope="module")
def server(shared_gallery: Path) -> Iterator[ServerProcess]:
    """One real server per test module over an index of ``shared_gallery``; read-only use."""
    index = shared_gallery.parent / "index"
    pictor("index", str(shared_gallery), "--out", str(index), "--no-progress")
    proc = ServerProcess(index).start()
    yield proc
    proc.stop()
