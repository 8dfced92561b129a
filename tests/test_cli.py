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
