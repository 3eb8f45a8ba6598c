"""A resume refuses a config that changes what was trained, privacy settings included."""

from __future__ import annotations

import pytest

from flora_lightning.rundir.resume_check import check_resumable
from flora_lightning.stages import dump_config, stage_parser

PRIVATE = ["--privacy.level", "client", "--privacy.noise_multiplier", "1.0"]


def saved_run(tmp_path, args: list[str]):
    """A run folder holding the config.yaml ``flora fit`` (and the ServerApp) would write."""
    parser = stage_parser("fit")
    (tmp_path / "config.yaml").write_text(dump_config(parser, parser.parse_args(args)))
    return tmp_path


def config_yaml(args: list[str]) -> str:
    parser = stage_parser("fit")
    return dump_config(parser, parser.parse_args(args))


@pytest.mark.parametrize(
    ("new", "field"),
    [
        (["--privacy.level", "none"], "privacy.level: 'client' -> 'none'"),
        ([*PRIVATE, "--privacy.noise_multiplier", "0.5"], "privacy.noise_multiplier: 1.0 -> 0.5"),
        ([*PRIVATE, "--privacy.clip_norm", "9"], "privacy.clip_norm: 1.0 -> 9.0"),
        ([*PRIVATE, "--privacy.delta", "1e-3"], "privacy.delta"),
        ([*PRIVATE, "--privacy.accountant", "prv"], "privacy.accountant"),
    ],
)
def test_a_private_run_cannot_resume_with_other_privacy(tmp_path, offline_assets, new, field):
    run = saved_run(tmp_path, PRIVATE)
    with pytest.raises(ValueError, match="trainer.resume") as error:
        check_resumable(run, config_yaml(new))
    assert field in str(error.value)


def test_a_resume_may_change_what_does_not_change_the_run(tmp_path, offline_assets):
    run = saved_run(tmp_path, PRIVATE)
    check_resumable(run, config_yaml([*PRIVATE, "--trainer.rounds", "99"]))  # no error
