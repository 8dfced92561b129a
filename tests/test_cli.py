"""The `pictor` entry point: subcommand dispatch and argument errors."""

from __future__ import annotations

import pytest

from pictor.cli import main


def test_unknown_arguments_show_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["search", "a.jpg", "--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: pictor search ")
    assert "pictor search: error: unrecognized arguments: --bogus" in err


def test_keys_with_line_breaks_stay_on_their_table_row() -> None:
    from pictor.client.cli import _one_line

    assert _one_line("photos/a.jpg") == "photos/a.jpg"
    assert _one_line("two\nlines.jpg") == "'two\\nlines.jpg'"
