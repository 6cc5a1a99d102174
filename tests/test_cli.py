"""The command line, run in-process."""

import pytest

from lowrank_layers import __version__
from lowrank_layers.cli import main


def test_demo_prints_a_report(capsys):
    assert main(["demo", "--hidden", "64", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| nn.Linear (dense) |" in out
    assert out.count("| LowRankLinear param_ratio=") == 3


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--hidden", "4"], "--hidden must be >= 16, got 4"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("lowrank-layers: error: ") and match in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
