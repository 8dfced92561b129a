"""The base install is the light client: `pictor.client` imports, torch does not exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_base_install_has_client_but_no_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Install from a copy, so the build leaves nothing behind in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", "tests", "sample", "bench"))
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        check=True, timeout=600,
    )
    probe = subprocess.run(
        [str(py), "-c",
         "import importlib.util, pathlib, pictor.client, pictor.cli\n"
         "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('faiss') is None,\n"
         "      (pathlib.Path(pictor.__file__).parent / 'py.typed').is_file())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    assert probe.stdout.split() == ["True", "True", "True"]  # py.typed: type checkers see the hints

    # Client subcommands work (here: fail cleanly on an unreachable server, exit 4) ...
    pictor = venv / "bin" / "pictor"
    info = subprocess.run([str(pictor), "info", "--target", "127.0.0.1:1", "--timeout", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert info.returncode == 4, info.stderr
    assert "cannot reach" in info.stderr and "--target HOST:PORT or PICTOR_TARGET" in info.stderr
    # ... and server-side ones say which extra to install.
    serve = subprocess.run([str(pictor), "serve"], capture_output=True, text=True, cwd=tmp_path)
    assert serve.returncode == 3
    assert "pip install '.[server]'" in serve.stderr
