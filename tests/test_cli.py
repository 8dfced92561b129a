"""The `pictor` entry point: subcommand dispatch and argument errors."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import drawn_image, pictor
from PIL import Image

from pictor.cli import main


def test_unknown_arguments_show_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["search", "a.jpg", "--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: pictor search ")
    assert "pictor search: error: unrecognized arguments: --bogus" in err
    # No abbreviations: `pictor add --key K` was taken as --key-prefix K, and stored "Ka.jpg".
    with pytest.raises(SystemExit):
        main(["add", "a.jpg", "--key", "k"])
    assert "pictor add: error: unrecognized arguments: --key" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "1_000"], "argument --port: not a whole number: '1_000'"),
    (["index", "g", "--out", "i", "--batch-size", "3_2"], "argument --batch-size: not a whole number: '3_2'"),
    (["train", "d", "--out", "m.pt", "--lr", "0.000_1"], "argument --lr: not a number: '0.000_1'"),
    (["train", "d", "--out", "m.pt", "--weight-decays", "0.1,1_0"], "argument --weight-decays: not a number: '1_0'"),
    (["classify", "a.jpg", "--top-k", "1_0"], "argument --top-k: not a whole number: '1_0'"),
])
def test_a_number_flag_with_an_underscore_is_refused(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """int("1_000") is 1000: a typo of 1000 or 1,000, refused as its variable is (PICTOR_PORT)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"pictor {argv[0]}: error: {message}" in capsys.readouterr().err


def test_a_bad_setting_in_the_environment_fails_every_command(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`PICTOR_OFFLINE=maybe pictor models` exited 0 (the value was read only when a download
    was needed), and `pictor serve` took PICTOR_BATCH_SIZE=0 that the indexer in the same
    environment would refuse."""
    monkeypatch.setenv("PICTOR_OFFLINE", "maybe")
    assert main(["models"]) == 2
    assert "pictor models: error: setting PICTOR_OFFLINE='maybe' is not a valid bool (1, true" in capsys.readouterr().err
    monkeypatch.delenv("PICTOR_OFFLINE")
    monkeypatch.setenv("PICTOR_BATCH_SIZE", "0")
    assert main(["serve", "--index", "no-such-index"]) == 2
    assert "batch_size must be between 1 and 4096, got 0 (from PICTOR_BATCH_SIZE)" in capsys.readouterr().err


def test_labels_in_a_list_are_quoted_where_they_could_be_misread() -> None:
    """`pictor info` showed "labels: Gänseblümchen, white 30, ...": two labels, or one?"""
    from pictor.client.cli import _label_counts_text

    counts = {"daisy": 3, "Gänseblümchen, white": 30, "": 2, " padded": 1, "it's": 1, "(none)": 1}
    assert _label_counts_text(counts) == ("'Gänseblümchen, white' 30, daisy 3, (none) 2, ' padded' 1, "
                                          "'(none)' 1, \"it's\" 1")


def test_a_torch_library_that_cannot_be_mapped_is_called_out_of_memory(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Under `ulimit -v 3000000` `pictor index` and `serve` ended in a traceback through torch's imports."""
    import argparse

    from pictor import cli

    def parsed(error: BaseException) -> Callable[[object], argparse.Namespace]:
        def run(args: argparse.Namespace) -> int:
            raise error

        return lambda argv: argparse.Namespace(command="index", run=run)

    monkeypatch.setattr(cli, "_parse_arguments", parsed(ImportError("libtorch_cpu.so: failed to map segment from "
                                                                    "shared object")))
    assert cli.main(["index"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pictor index: error: out of memory: libtorch_cpu.so: failed to map segment")
    assert "ulimit -v" in err
    monkeypatch.setattr(cli, "_parse_arguments", parsed(MemoryError()))
    assert cli.main(["index"]) == 2
    assert capsys.readouterr().err == "pictor index: error: out of memory\n"
    monkeypatch.setattr(cli, "_parse_arguments", parsed(OSError("libtorch_cuda.so: failed to map segment from "
                                                                "shared object")))  # through ctypes
    assert cli.main(["index"]) == 2 and "out of memory: libtorch_cuda.so" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_parse_arguments", parsed(ImportError("libfoo.so: cannot open shared object file")))
    with pytest.raises(ImportError, match="libfoo"):  # not memory: the traceback says where
        cli.main(["index"])


@pytest.mark.parametrize("command", [["backup", "{long}", "copy"], ["eval", "{long}", "data"],
                                     ["index", "data", "--out", "{long}"]])
def test_a_path_too_long_for_the_system_is_an_error_not_a_traceback(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    long = str(tmp_path / ("a" * 5000))  # over NAME_MAX and PATH_MAX: Path.exists() raises for it
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(drawn_image(0))
    monkeypatch.chdir(tmp_path)
    assert main([part.format(long=long) for part in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pictor {command[0]}: error: ") and err.endswith("more characters): File name too long\n")


def test_options_may_come_between_files() -> None:
    from pictor.cli import _parse_arguments

    args = _parse_arguments(["classify", "a.jpg", "--top-k", "1", "b.jpg", "--json", "c.jpg"])
    assert (args.images, args.top_k, args.json) == (["a.jpg", "b.jpg", "c.jpg"], 1, True)
    args = _parse_arguments(["-v", "delete", "k1", "--missing-ok", "k2"])
    assert (args.keys, args.missing_ok, args.verbose) == (["k1", "k2"], True, True)
    assert _parse_arguments(["delete", "k1", "-v"]).verbose is True  # after the command too
    assert _parse_arguments(["delete", "k1"]).verbose is False


def test_keys_with_line_breaks_stay_on_their_table_row() -> None:
    from pictor.client.cli import _table_cell

    assert _table_cell("photos/a.jpg") == "photos/a.jpg"
    assert _table_cell("two\nlines.jpg") == "'two\\nlines.jpg'"
    assert _table_cell("two\u2029paragraphs.jpg") == "'two\\u2029paragraphs.jpg'"
    assert _table_cell("del\x7f.jpg") == "'del\\x7f.jpg'"
    assert _table_cell(" spaced ") == "' spaced '"


def test_a_json_line_holds_one_record_whatever_its_keys_hold() -> None:
    from pictor.client.cli import _json_line

    record = {"key": "a\u2028b\x85c\u2029d\ne.jpg", "label": "Z\u00fcrich", "attributes": {}}
    line = _json_line(record)
    assert len(line.splitlines()) == 1 and "Z\u00fcrich" in line  # readable, not \\u-escaped
    assert json.loads(line) == record


def test_an_empty_knn_vote_says_why() -> None:
    from pictor.client.cli import _classification_lines
    from pictor.client.client import Classification, Hit, Label

    unlabelled = [Hit("x.jpg", 0.9), Hit("y.jpg", 0.8)]  # (an index with no label at all is refused)
    lines = _classification_lines("a.jpg", Classification(labels=[], source="knn", neighbors=unlabelled),
                                  neighbours=False)
    assert lines == ["a.jpg  (knn)", "  (no vote: none of the 2 nearest items has a label; --neighbors takes more)"]
    voted = Classification(labels=[Label("cat", 1.0)], source="knn")
    assert _classification_lines("a.jpg", voted, neighbours=False) == ["a.jpg  (knn)", "   1.000  cat"]


def test_an_unknown_answer_says_why() -> None:
    from pictor.client.cli import _classification_lines
    from pictor.client.client import Classification, Label, OpenSetCheck

    reason = "class fit 1.204 < 2.585 and nearest indexed item of the model's classes at similarity 0.480 < 0.508"
    r = Classification(labels=[Label("roses", 0.99)], source="head", unknown=True,
                       open_set=OpenSetCheck(class_fit=1.204, nearest_similarity=0.48, reason=reason))
    assert _classification_lines("a.jpg", r, neighbours=False) == [
        "a.jpg  (head, UNKNOWN)", f"  unknown: {reason}", "   0.990  roses"]


def test_an_attribute_given_twice_with_two_values_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # A filter holds one value per name: the last would silently win.
    code = main(["search", "--key", "a.jpg", "--attr", "season=spring", "--attr", "season=summer",
                 "--target", "127.0.0.1:9"])
    assert code == 2
    assert "--attr season is given twice ('spring' and 'summer')" in capsys.readouterr().err


def test_an_empty_target_is_refused_not_taken_for_the_default(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PICTOR_TARGET", raising=False)
    assert main(["info", "--target", ""]) == 2  # localhost:50051 would have answered, maybe another server
    assert "target is empty" in capsys.readouterr().err


def test_classify_json_lists_every_image_wherever_ctrl_c_comes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while an image's error is being reported (no server asked: the files are missing)."""
    from pictor.client import cli as client_cli

    said = client_cli.one_line
    interrupted: list[str] = []
    def interrupted_at_the_second(text: str) -> str:
        if "1.png" in text and not interrupted:
            interrupted.append(text)
            raise KeyboardInterrupt
        return said(text)

    monkeypatch.setattr(client_cli, "one_line", interrupted_at_the_second)
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    assert main(["classify", *paths, "--json", "--target", "127.0.0.1:9"]) == 130
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [r["image"] for r in results] == paths
    assert "no such file" in results[0]["error"]
    assert [r["error"] for r in results[1:]] == ["not classified: interrupted",
                                                 *[f"not classified: not sent (interrupted at {paths[1]})"] * 2]
    assert f"{paths[1]} and the 2 image(s) after it were not classified; the results of the 1 before it" in err


def test_classify_stopped_at_its_last_image_names_that_one_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.client import cli as client_cli

    said = client_cli.read_image_file
    def interrupted_at_the_last(path: str, **options: Any) -> bytes:
        if path.endswith("b\nc.png"):
            raise KeyboardInterrupt
        return said(path, **options)

    monkeypatch.setattr(client_cli, "read_image_file", interrupted_at_the_last)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b\nc.png")]  # a line break in a name stays on its line
    assert main(["classify", *paths, "--target", "127.0.0.1:9"]) == 130
    err = capsys.readouterr().err
    assert f"{tmp_path}/b\\nc.png was not classified; the results of the 1 before it are printed" in err


def test_add_refuses_files_that_are_no_images_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.png").touch()  # read as no image bytes, it was "neither image nor vector"
    assert main(["add", str(tmp_path / "empty.png"), "--target", "127.0.0.1:9"]) == 2  # no server asked
    assert f"{tmp_path / 'empty.png'}: an empty file (0 bytes), not an image" in capsys.readouterr().err
    # Every such file at once; a name that cannot be a key as `pictor index` says it; a file no
    # image is as large as refused by its size (sparse: nothing is read or written).
    latin1 = os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.png")
    Path(latin1).write_bytes(drawn_image(1))
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(3 * 2**30)
    with open(tmp_path / "large.jpg", "wb") as f:
        f.truncate(65 * 2**20)  # over the client's message limit, which it says as the client would
    paths = [str(tmp_path / "empty.png"), latin1, str(tmp_path / "huge.jpg"), str(tmp_path / "missing.png"),
             str(tmp_path / "large.jpg")]
    assert main(["add", *paths, "--target", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "5 of the 5 files cannot be added, so none was:" in err
    assert f"{tmp_path / 'large.jpg'}: a request of 65.00 MB is over this client's 64 MB limit" in err
    assert f"{tmp_path / 'caf'}\\xe9.png: the file name is not UTF-8 text, which a key must be; rename the file" in err
    assert f"{tmp_path / 'huge.jpg'}: a file of 3.00 GB, larger than any image Pictor reads (1 GB); not read" in err
    assert f"{tmp_path / 'missing.png'}: no such file" in err


def test_text_that_is_not_utf8_is_named_by_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    label = os.fsdecode(b"rose\xfe")  # as a shell passes bytes that are not UTF-8
    assert main(["add", "README.md", "--label", label, "--target", "127.0.0.1:9"]) == 2
    assert "--label 'rose\\xfe' is not UTF-8 text" in capsys.readouterr().err


def test_keys_that_are_not_utf8_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    key = os.fsdecode(b"g1/red/\xff\xfe.jpg")  # a file name's bytes, as a shell passes them
    for command in (["get", key], ["delete", key], ["search", "--key", key]):
        assert main([*command, "--target", "127.0.0.1:9"]) == 2
        assert "'g1/red/\\xff\\xfe.jpg' is not UTF-8 text" in capsys.readouterr().err
    assert main(["get", "k\ud800", "--target", "127.0.0.1:9"]) == 2  # a lone surrogate no file name gives
    assert "'k\\ud800' is not UTF-8 text" in capsys.readouterr().err
    assert main(["backup", key, "elsewhere"]) == 2  # any error naming such a path: \xNN, not \udcNN
    assert capsys.readouterr().err == "pictor backup: error: index directory g1/red/\\xff\\xfe.jpg does not exist\n"
    assert main(["backup", "idx\nINFO pictor: backed up", "elsewhere"]) == 2  # nor forge a line of its own
    assert capsys.readouterr().err == "pictor backup: error: index directory idx\\nINFO pictor: backed up does not exist\n"


def test_library_warnings_are_log_lines() -> None:
    # Raw, a library's warnings reached a server's stderr apart from its log, without time or
    # level (Pillow's, on a photo's corrupt EXIF, are now left out unless -v: below).
    code = ("import warnings; from pictor.cli import _parse_arguments; _parse_arguments(['models']); "
            "warnings.warn('Corrupt EXIF data', UserWarning)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert " WARNING py.warnings: " in err and "UserWarning: Corrupt EXIF data" in err


def test_log_lines_escape_the_file_names_they_quote() -> None:
    from pictor.cli import _OneLineFormatter

    formatter = _OneLineFormatter("%(levelname)s %(name)s: %(message)s")

    def line(name: str, *args: object, exc_info: Any = None) -> str:
        return formatter.format(logging.LogRecord(name, logging.WARNING, __file__, 1, "skipped %s: %s", args,
                                                  exc_info))

    assert line("pictor.trainer", "a\nb.jpg", "bad") == r"WARNING pictor.trainer: skipped a\nb.jpg: bad"
    assert line("pictor.trainer", "\udcff\u2028.jpg", "bad") == r"WARNING pictor.trainer: skipped \xff\u2028.jpg: bad"
    assert line("grpc", "a\nb", "x") == "WARNING grpc: skipped a\nb: x"  # other libraries' records as written
    try:
        raise ValueError("boom")
    except ValueError:
        text = line("pictor.server", "a", "b", exc_info=sys.exc_info())
    assert text.startswith("WARNING pictor.server: skipped a: b\nTraceback")  # a traceback keeps its lines


def test_pillows_notes_on_odd_files_are_left_out_unless_verbose(tmp_path: Path) -> None:
    # Each came as three lines naming Pillow's source, not the file ("Corrupt EXIF data").
    (tmp_path / "g" / "a").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buf, "JPEG", exif=b"Exif\0\0II*\0\x08\0\0\0\x05\0\x12\x01\x03\0")
    (tmp_path / "g" / "a" / "bad_exif.jpg").write_bytes(buf.getvalue())
    quiet = pictor("index", str(tmp_path / "g"), "--out", str(tmp_path / "i1"), "--weights", "random")
    assert "indexed 1 image" in quiet.stdout and "EXIF" not in quiet.stderr
    verbose = pictor("-v", "index", str(tmp_path / "g"), "--out", str(tmp_path / "i2"), "--weights", "random")
    assert "Corrupt EXIF data" in verbose.stderr
