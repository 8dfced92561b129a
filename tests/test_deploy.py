"""The Dockerfile and docker-compose.yml against the code they run (no Docker needed): a
renamed flag or a missing folder would otherwise show only at `docker compose up`."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pictor.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def test_what_the_image_copies_exists_and_is_in_the_build_context() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [src for line in _dockerfile().splitlines() if line.startswith("COPY ") and "--from" not in line
               for src in line.split()[1:-1]]
    assert "pyproject.toml" in sources and "core" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), f"{src} is in .dockerignore"
    packaged = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packaged <= set(sources), f"not copied into the image: {packaged - set(sources)}"


def test_the_commands_the_image_and_compose_run_are_valid() -> None:
    parser = build_parser()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = [service["command"] for service in compose["services"].values() if service["image"] == "pictor:latest"]
    assert len(commands) == 3  # the indexer's, the server's and the trainer's
    (health,) = re.findall(r"HEALTHCHECK .* CMD (.+)", _dockerfile())
    commands.append(shlex.split(health.replace("${PICTOR_PORT:-50051}", "50051"))[1:])
    (default,) = re.findall(r'^CMD \["(\w+)"\]', _dockerfile(), re.M)
    commands.append([default])
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`pictor {shlex.join(argv)}` does not parse")
    # The server listens on every interface of its container; the host publishes it on
    # loopback unless PICTOR_BIND says otherwise (it has no authentication yet).
    published = compose["services"]["server"]["ports"]  # gRPC and metrics
    assert len(published) == 2 and all(p.startswith("${PICTOR_BIND:-127.0.0.1}:") for p in published)
    assert published[1].endswith(":9464") and "PICTOR_METRICS_PORT=9464" in _dockerfile()
    # The optional Prometheus (--profile metrics) scrapes that port of the server.
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["server:9464"]
    assert compose["services"]["prometheus"]["profiles"] == ["metrics"]
    # The trainer runs only when named, and writes the model file the server is told to serve.
    trainer, server = compose["services"]["trainer"], compose["services"]["server"]
    assert trainer["profiles"] == ["train"] and trainer["pull_policy"] == "never"
    out = trainer["command"][trainer["command"].index("--out") + 1]
    assert f"PICTOR_MODEL={out}" in (ROOT / "docker-compose.yml").read_text()
    assert server["environment"]["PICTOR_MODEL"] == "${PICTOR_MODEL:-}"
    assert "pictor-data:/data" in trainer["volumes"] and "pictor-data:/data" in server["volumes"]
    # The image is built by the indexer's `build`, never pulled: the server's would be tried
    # from a registry first, where there is none.
    assert compose["services"]["server"]["pull_policy"] == "never" and "build" in compose["services"]["indexer"]
    # As PID 1, pictor would ignore a SIGTERM that came before Python installed its handler.
    assert all(service.get("init") is True for service in compose["services"].values())


def test_the_demo_removes_only_what_an_earlier_demo_made(tmp_path: Path) -> None:
    # DEMO_DIR may name a folder of other things (it was emptied whole: DEMO_DIR=$HOME...).
    stub = tmp_path / "bin" / "pictor"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 1\n")  # the demo stops at its first step
    stub.chmod(0o755)
    work = tmp_path / "mine"
    (work / "index").mkdir(parents=True)
    (work / "notes.txt").write_text("kept")
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "DEMO_DIR": str(work),
           "DEMO_PORT": "50051"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 1 and "== 1. index the sample gallery" in run.stdout
    assert (work / "notes.txt").read_text() == "kept" and not (work / "index").exists()


def test_the_tls_overlay_sets_only_what_the_server_reads() -> None:
    from pictor.config import unknown_env_names

    overlay = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    assert list(overlay["services"]) == ["server"]
    commented = re.findall(r"#\s+(PICTOR_\w+):", (ROOT / "docker-compose.tls.yml").read_text())
    environment = [*overlay["services"]["server"]["environment"], *commented]
    assert unknown_env_names(dict.fromkeys(environment, "")) == [] and "PICTOR_TLS_CLIENT_CA" in commented
    assert overlay["services"]["server"]["volumes"] == ["${PICTOR_TLS_DIR:-./tls}:/tls:ro"]
