from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from pictor.client import PictorClient
from pictor.config import (
    IndexerSettings,
    ServerSettings,
    build_settings,
    client_max_message_mb,
    set_by,
    unknown_env_names,
)
from pictor.errors import InvalidRequestError


def test_defaults_work_without_anything() -> None:
    s = build_settings(ServerSettings, {}, env={})
    assert (s.host, s.port, s.index, s.model) == ("127.0.0.1", 50051, "index", "")


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pictor.toml"
    cfg.write_text('port = 7000\nhost = "0.0.0.0"\nworkers = 3\n')
    env = {"PICTOR_PORT": "7001", "PICTOR_WORKERS": "5"}
    s = build_settings(ServerSettings, {"port": 7002, "workers": None}, env=env, config_file=cfg)
    assert s.port == 7002  # flag
    assert s.workers == 5  # env, coerced to int
    assert s.host == "0.0.0.0"  # file
    # A switch set on in the environment or file can be set off by its flag.
    from pictor.cli import build_parser

    for command in ("serve", "index"):
        flags = vars(build_parser().parse_args([command, "--no-compile"]))
        assert build_settings(ServerSettings, flags, env={"PICTOR_COMPILE": "1"}).compile is False


def test_nested_settings_read_the_same_flags_and_file_names(tmp_path: Path) -> None:
    cfg = tmp_path / "pictor.toml"
    cfg.write_text('out = "idx"\nbackbone = "resnet50"\nbatch_size = 8\nmax_pixels = 5000\n')
    s = build_settings(IndexerSettings, {"batch_size": 16}, env={}, config_file=cfg)
    assert s.out == "idx"
    assert s.model.backbone == "resnet50"
    assert s.model.batch_size == 16
    # One name, one meaning: serve reads the same max_pixels as index.
    assert s.model.max_pixels == build_settings(ServerSettings, {}, env={}, config_file=cfg).max_pixels == 5000


def test_bad_values_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="setting PICTOR_PORT='many' is not a valid int"):
        build_settings(ServerSettings, {}, env={"PICTOR_PORT": "many"})
    # The message lists the words a yes/no setting takes.
    with pytest.raises(InvalidRequestError, match=r"setting PICTOR_COMPILE='maybe' is not a valid bool "
                       r"\(1, true, yes, on or 0, false, no, off\)"):
        build_settings(ServerSettings, {}, env={"PICTOR_COMPILE": "maybe"})
    # int() reads "1_000" as 1000: a typo of 1000 or 1,000 is refused rather than guessed.
    with pytest.raises(InvalidRequestError, match="setting PICTOR_PORT='1_000' is not a valid int"):
        build_settings(ServerSettings, {}, env={"PICTOR_PORT": "1_000"})
    assert build_settings(ServerSettings, {}, env={"PICTOR_COMPILE": "off"}).compile is False
    with pytest.raises(InvalidRequestError, match="does not exist"):
        build_settings(ServerSettings, {}, env={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(InvalidRequestError, match="port must be between 0 .* got -1"):
        build_settings(ServerSettings, {"port": -1}, env={})
    for seconds in ("0", "nan", "inf"):
        with pytest.raises(InvalidRequestError, match=rf"upsert_idle_timeout must be a number of seconds above 0, at most 604800 \(a week\), got {seconds}"):
            build_settings(ServerSettings, {}, env={"PICTOR_UPSERT_IDLE_TIMEOUT": seconds})
    # A batch size of 0 made one batch of the whole gallery.
    with pytest.raises(InvalidRequestError, match="batch_size must be between 1 and 4096, got 0"):
        build_settings(IndexerSettings, {}, env={"PICTOR_BATCH_SIZE": "0"})
    with pytest.raises(InvalidRequestError, match="workers must be between 1 and 256, got -1"):
        build_settings(IndexerSettings, {"workers": -1}, env={})
    # One handler thread would be the only one, held by any open Upsert stream.
    with pytest.raises(InvalidRequestError, match=r"workers must be at least 2 \(one is always kept for health checks"):
        build_settings(ServerSettings, {"workers": 1}, env={})
    # Sizes that cost memory per unit: a typo is refused before the model loads, not run out of memory.
    with pytest.raises(InvalidRequestError, match=r"workers must be at least 2 .* and at most 1024, got 100000"):
        build_settings(ServerSettings, {"workers": 100_000}, env={})
    with pytest.raises(InvalidRequestError, match="batch_size must be between 1 and 4096, got 100000"):
        build_settings(IndexerSettings, {"batch_size": 100_000}, env={})
    with pytest.raises(InvalidRequestError, match=r"batch_size must be between 1 and 4096, got 0 \(from --batch-size\)"):
        build_settings(ServerSettings, {"batch_size": 0}, env={})
    assert build_settings(ServerSettings, {}, env={}).batch_size == 8  # the server's passes: see ServerSettings
    assert build_settings(ServerSettings, {}, env={"PICTOR_BATCH_SIZE": "32"}).batch_size == 32
    assert build_settings(ServerSettings, {}, env={}).max_queue_delay_ms == 0  # no call waits for others
    assert build_settings(ServerSettings, {}, env={"PICTOR_MAX_QUEUE_DELAY_MS": "2.5"}).max_queue_delay_ms == 2.5
    for ms in (-0.5, 1000.5, math.nan):
        with pytest.raises(InvalidRequestError, match=rf"max_queue_delay_ms must be between 0 and 1000 milliseconds, got {ms} \(from --max-queue-delay-ms\)"):
            build_settings(ServerSettings, {"max_queue_delay_ms": ms}, env={})
    with pytest.raises(InvalidRequestError, match="workers must be between 1 and 256, got 1000"):
        build_settings(IndexerSettings, {}, env={"PICTOR_WORKERS": "1000"})
    assert build_settings(IndexerSettings, {"batch_size": 4096, "workers": 256}, env={}).model.batch_size == 4096
    # gRPC takes the limit as int32 bytes: 2048 MB raised a bare OverflowError.
    for mb in ("0", "2048"):
        with pytest.raises(InvalidRequestError, match=f"max_message_mb must be between 1 and 2047, got {mb}"):
            build_settings(ServerSettings, {}, env={"PICTOR_MAX_MESSAGE_MB": mb})
        with pytest.raises(InvalidRequestError, match=f"max_message_mb must be between 1 and 2047, got {mb}"):
            PictorClient("localhost:50051", max_message_mb=int(mb))
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(InvalidRequestError, match="not valid TOML"):
        build_settings(ServerSettings, {}, env={}, config_file=bad)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    with pytest.raises(InvalidRequestError, match="fifo.toml is not a regular file"):
        build_settings(ServerSettings, {}, env={}, config_file=fifo)
    # Path("") is the current folder: an index written into it, or served from it, by mistake.
    with pytest.raises(InvalidRequestError, match=r"index must be the index's folder, got '' \(empty\)"):
        build_settings(ServerSettings, {"index": ""}, env={})
    assert build_settings(ServerSettings, {}, env={"PICTOR_INDEX": ""}).index == "index"  # unset: the default
    with pytest.raises(InvalidRequestError, match=r"out must be the index's folder, got '' \(empty\)"):
        build_settings(IndexerSettings, {"out": ""}, env={})


def test_one_file_names_the_model_for_index_and_serve(tmp_path: Path) -> None:
    cfg = tmp_path / "pictor.toml"
    cfg.write_text('model = "flowers.pt"\nbackbone = "resnet50"\n')
    assert build_settings(ServerSettings, {}, env={}, config_file=cfg).model == "flowers.pt"
    indexer = build_settings(IndexerSettings, {}, env={}, config_file=cfg)
    assert (indexer.model_file, indexer.model.backbone) == ("flowers.pt", "resnet50")
    env = {"PICTOR_MODEL": "other.pt"}
    assert build_settings(IndexerSettings, {}, env=env, config_file=cfg).model_file == "other.pt"
    flags = {"model_file": "flag.pt"}  # `pictor index --model flag.pt`
    assert build_settings(IndexerSettings, flags, env=env, config_file=cfg).model_file == "flag.pt"


def test_file_names_and_types_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "pictor.toml"
    # One file for every command: an indexer name does not upset `serve`.
    cfg.write_text('port = 7000\ngallery = "photos"\nbackbone = "resnet50"\n')
    s = build_settings(ServerSettings, {}, env={}, config_file=cfg)
    assert (s.port, s.model) == (7000, "")
    assert build_settings(IndexerSettings, {}, env={}, config_file=cfg).model.backbone == "resnet50"
    cases: list[tuple[str | bytes, str]] = [
        ("prot = 7000\n", "unknown setting 'prot'; valid names: .*port"),
        # A table once set the indexer's model settings and was ignored by serve, and its name
        # clashed with the model file's: the file is flat now.
        ("[model]\nbackbone = 'resnet50'\n", r"a table \[model\], but the file is flat"),
        ("[server]\nport = 1\n", r"a table \[server\], but the file is flat"),
        (b"# caf\xe9\nport = 1\n", r"is not UTF-8 text \(byte 5\), as TOML must be"),
        ("port = 1.5\n", "port=1.5 in the config file is not a valid int"),
        ("workers = true\n", "workers=True in the config file is not a valid int"),
        ("compile = 1\n", r"compile=1 in the config file is not a valid bool \(true or false\)"),
        # A file has types: text is refused as a number or a yes/no, as 1.5 is refused as an int
        # (port = "6000" was taken, port = 6000.0 refused).
        ('port = "6000"\n', "port='6000' in the config file is not a valid int; write it without quotes"),
        ('pca_whiten = "64"\n', "pca_whiten='64' in the config file"),  # an indexer setting, refused by serve too
        # A model setting's value is checked by every command that reads the file (serve has no batch size).
        ("batch_size = 0\n", r"batch_size must be between 1 and 4096, got 0 \(from batch_size in the config file\)"),
        ('compile = "yes"\n', r"compile='yes' in the config file is not a valid bool \(true or false\); write it"),
    ]
    for text, message in cases:
        if isinstance(text, bytes):
            cfg.write_bytes(text)
        else:
            cfg.write_text(text)
        with pytest.raises(InvalidRequestError, match=message):
            build_settings(ServerSettings, {}, env={}, config_file=cfg)
    with pytest.raises(InvalidRequestError, match="is a directory, not a file"):
        build_settings(ServerSettings, {}, env={}, config_file=tmp_path)
    cfg.write_bytes("\ufeffport = 7001\n".encode())  # a byte-order mark, as some editors write
    assert build_settings(ServerSettings, {}, env={}, config_file=cfg).port == 7001


def test_unknown_environment_names_are_found() -> None:
    # `pictor` warns about these: a typo would otherwise be ignored without a word.
    env = {"PICTOR_PROT": "5", "PICTOR_PORT": "1", "PICTOR_BATCH_SIZE": "8", "PICTOR_MODEL": "m.pt",
           "PICTOR_CACHE_DIR": "/c", "PICTOR_CONFIG": "p.toml", "PICTOR_BIND": "0.0.0.0", "HOME": "/root"}
    assert unknown_env_names(env) == ["PICTOR_PROT"]


def test_client_commands_read_the_message_limit_the_server_reads(monkeypatch) -> None:
    monkeypatch.delenv("PICTOR_MAX_MESSAGE_MB", raising=False)
    assert client_max_message_mb() == 64
    monkeypatch.setenv("PICTOR_MAX_MESSAGE_MB", "256")
    assert client_max_message_mb() == 256
    monkeypatch.setenv("PICTOR_MAX_MESSAGE_MB", "lots")
    with pytest.raises(InvalidRequestError, match="PICTOR_MAX_MESSAGE_MB='lots' is not a valid int"):
        client_max_message_mb()
    monkeypatch.setenv("PICTOR_MAX_MESSAGE_MB", "0")
    with pytest.raises(InvalidRequestError, match=r"between 1 and 2047, got 0 \(from PICTOR_MAX_MESSAGE_MB\)"):
        client_max_message_mb()


def test_a_value_out_of_range_names_where_it_was_set(tmp_path: Path) -> None:
    # The message names the flag, variable or file line to change, not only the setting.
    cfg = tmp_path / "pictor.toml"
    cfg.write_text("workers = 1\n")
    for flags, env, source in [
        ({"workers": 1}, {}, "--workers"),
        ({}, {"PICTOR_WORKERS": "1"}, "PICTOR_WORKERS"),
        ({}, {}, "workers in the config file"),
    ]:
        with pytest.raises(InvalidRequestError, match=rf"workers must be at least 2 .*, got 1 \(from {source}\)$"):
            build_settings(ServerSettings, flags, env=env, config_file=cfg)
    cfg.write_text("batch_size = 0\n")
    with pytest.raises(InvalidRequestError, match=r"batch_size must be between 1 and 4096, got 0 \(from batch_size in"):
        build_settings(IndexerSettings, {}, env={}, config_file=cfg)
    with pytest.raises(InvalidRequestError, match=r"max_pixels must be at least 1, got 0 \(from --max-pixels\)$"):
        build_settings(IndexerSettings, {"max_pixels": 0}, env={})


def test_choices_are_checked_with_their_source_and_empty_variables_count_as_unset(tmp_path: Path) -> None:
    for name, value in [("pooling", "foo"), ("precision", "fp64"), ("device", "gpu"), ("labels", "foo")]:
        with pytest.raises(InvalidRequestError, match=rf"{name} must be .*, got '{value}' \(from PICTOR_{name.upper()}\)$"):
            build_settings(IndexerSettings, {}, env={f"PICTOR_{name.upper()}": value})
    with pytest.raises(InvalidRequestError, match=r"upsert_idle_timeout must be .* at most 604800 \(a week\), got 10000000000.0"):
        build_settings(ServerSettings, {}, env={"PICTOR_UPSERT_IDLE_TIMEOUT": "1e10"})  # Python's waits end at 9.2e9 s
    # An empty variable (compose passes an unset one as "") is no setting: the file's value stands.
    cfg = tmp_path / "pictor.toml"
    cfg.write_text("port = 7000\nmax_message_mb = 100\n")
    s = build_settings(ServerSettings, {}, env={"PICTOR_PORT": "", "PICTOR_MAX_MESSAGE_MB": ""}, config_file=cfg)
    assert (s.port, s.max_message_mb) == (7000, 100)
    # --config "" (a flag) switches PICTOR_CONFIG's file off.
    assert build_settings(ServerSettings, {}, env={"PICTOR_CONFIG": str(cfg)}, config_file="").port == 50051


def test_settings_say_where_each_was_set(tmp_path: Path) -> None:
    cfg = tmp_path / "pictor.toml"
    cfg.write_text('index_type = "HNSW32"\n')
    s = build_settings(IndexerSettings, {"pca_whiten": 8}, env={"PICTOR_POOLING": "max"}, config_file=cfg)
    assert (set_by(s, "pca_whiten"), set_by(s, "index_type"), set_by(s.model, "pooling")) == (
        "--pca-whiten", "index_type in the config file", "PICTOR_POOLING")
    assert set_by(s, "out") == ""  # the default
    assert s.model.disagreement("efficientnet_lite0", "avg") == "pooling max (PICTOR_POOLING)"
