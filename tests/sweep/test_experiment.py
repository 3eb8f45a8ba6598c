"""The experiments' shared command line and report writing."""

from __future__ import annotations

import pytest

from flora_lightning.sweep.experiment import run_measure, write_report


def measure(count: int = 1, name: str = "x") -> dict:
    """Doubles ``count``.

    Args:
        count: how many (>= 1).
        name: a label.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count}).")
    return {"count": 2 * count, "name": name}


def test_arguments_come_from_the_signature():
    assert run_measure(measure, "m.py", "Doubles.\n", ["--count", "3", "--name", "y"]) == {
        "count": 6, "name": "y"
    }  # fmt: skip


def test_a_value_error_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        run_measure(measure, "m.py", "Doubles.\n", ["--count", "0"])
    assert info.value.code == 2
    assert "count must be >= 1 (got 0)." in capsys.readouterr().err


def test_write_report_makes_the_folder_and_echoes(tmp_path, capsys):
    report = tmp_path / "deep" / "r.md"
    write_report(report, ["# title", "", "body"])
    assert report.read_text() == "# title\n\nbody"
    assert "body" in capsys.readouterr().out
