"""Differential privacy in a run: ``--privacy.*`` on ``flora fit`` (in-process loop)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from flora_lightning.privacy import DPFedAvg, DPSGDStep, PrivacyConfig
from flora_lightning.rundir.checkpoint import load_state
from flora_lightning.strategy import LoraProductAverage

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def opacus_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis called directly (what the RDP accountant composes)."""
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    return get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0]


def test_client_level_run_accounts_epsilon_per_round(make_flora, make_datamodule, make_loop):
    loop = make_loop(rounds=3, join_ratio=2 / 3)
    loop.use_privacy(PrivacyConfig(level="client", noise_multiplier=1.1, clip_norm=0.5))
    summary = loop.fit(make_flora(), make_datamodule())

    assert isinstance(loop.strategy, DPFedAvg)
    assert loop.strategy.num_sampled_clients == 2
    epsilons = [r["privacy_epsilon"] for r in summary["rounds"]]
    assert epsilons[0] == 0.0
    for round_, epsilon in enumerate(epsilons[1:], start=1):
        assert epsilon == pytest.approx(opacus_epsilon(2 / 3, 1.1, round_, 1e-5), abs=1e-6)
    assert summary["privacy"] == {
        "level": "client",
        "epsilon": epsilons[-1],
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "clip": 0.5,
        "accountant": "rdp",
    }


def test_sample_level_run_uses_dpsgd_and_accounts_each_client(
    make_flora, make_datamodule, make_loop
):
    data = make_datamodule()
    loop = make_loop(rounds=2, max_local_steps=2)
    loop.use_privacy(PrivacyConfig(level="sample", noise_multiplier=1.0, max_grad_norm=1.0))
    summary = loop.fit(make_flora(), data)

    assert isinstance(loop.local_trainer.step_fn, DPSGDStep)
    # Every client joined both rounds with 2 local steps at q = batch / n_k; the run reports
    # the largest client epsilon.
    expected = max(opacus_epsilon(32 / data.num_samples(k), 1.0, 2 * 2, 1e-5) for k in range(3))
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, abs=1e-6)
    assert summary["privacy"]["level"] == "sample" and summary["privacy"]["clip"] == 1.0
    assert summary["privacy"]["sampling"] == "poisson"  # the default, as the released code
    assert all(math.isfinite(r["test_loss"]) for r in summary["rounds"])
    written = json.loads((loop.run_dir / "summary.json").read_text())
    assert written["privacy"]["sampling"] == "poisson"


def test_shuffled_batches_are_an_option_reported_as_such(make_flora, make_datamodule, make_loop):
    data = make_datamodule()
    loop = make_loop(rounds=1, max_local_steps=1)
    privacy = PrivacyConfig(level="sample", noise_multiplier=1.0, sampling="shuffle")
    loop.use_privacy(privacy)
    with pytest.warns(UserWarning, match="approximation"):
        summary = loop.fit(make_flora(), data)
    assert loop.local_trainer.step_fn.sampling == "shuffle"
    assert summary["privacy"]["sampling"] == "shuffle"
    # The accountant composes the same Poisson bound either way (q = batch / n_k, 1 step).
    expected = max(opacus_epsilon(32 / data.num_samples(k), 1.0, 1, 1e-5) for k in range(3))
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, abs=1e-6)


def test_target_epsilon_picks_the_noise_for_the_planned_rounds(
    make_flora, make_datamodule, make_loop
):
    loop = make_loop(rounds=2)
    loop.use_privacy(PrivacyConfig(level="client", target_epsilon=8.0))
    summary = loop.fit(make_flora(), make_datamodule())
    assert summary["privacy"]["epsilon"] == pytest.approx(8.0, rel=0.02)
    assert summary["privacy"]["epsilon"] <= 8.0 + 1e-6


def test_dp_runs_are_reproducible_and_resume_keeps_the_accountant(
    make_flora, make_datamodule, make_loop
):
    def private(**kwargs):
        loop = make_loop(**kwargs)
        loop.use_privacy(
            PrivacyConfig(
                level="client",
                noise_multiplier=0.8,
                adaptive_clipping=True,
                clipped_count_stddev=1.0,
            )
        )
        return loop

    full = private(rounds=3, run="a")
    full_summary = full.fit(make_flora(), make_datamodule())
    again = private(rounds=3, run="b")
    again.fit(make_flora(), make_datamodule())
    for name in ("round_003.safetensors",):
        a = load_state(full.run_dir / "checkpoints" / name)
        b = load_state(again.run_dir / "checkpoints" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same noise: seeded

    private(rounds=1, run="c").fit(make_flora(), make_datamodule())
    saved = json.loads((full.run_dir / "resume" / "state.json").read_text())
    assert "privacy" in saved
    resumed = private(rounds=3, run="c", resume=True)
    summary = resumed.fit(make_flora(seed=3), make_datamodule())
    assert summary["privacy"]["epsilon"] == pytest.approx(
        full_summary["privacy"]["epsilon"], abs=1e-9
    )
    assert summary["privacy"]["clip"] == pytest.approx(full_summary["privacy"]["clip"])
    a = load_state(full.run_dir / "checkpoints" / "round_003.safetensors")
    b = load_state(resumed.run_dir / "checkpoints" / "round_003.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_unsupported_aggregation_is_refused_before_training(make_flora, make_datamodule, make_loop):
    loop = make_loop(rounds=1, strategy=LoraProductAverage())
    loop.use_privacy(PrivacyConfig(level="client", noise_multiplier=1.0))
    with pytest.raises(ValueError, match="LoraProductAverage"):
        loop.fit(make_flora(), make_datamodule())
    assert not loop.run_dir.exists()


def test_privacy_flags_on_the_command_line(offline_assets, tmp_path):
    from flora_lightning.stages import stage_parser

    parser = stage_parser("fit")
    config = parser.parse_args(["--privacy.level", "client", "--privacy.noise_multiplier", "1"])
    assert parser.instantiate_classes(config).privacy == PrivacyConfig(
        level="client", noise_multiplier=1.0
    )
    with pytest.raises(Exception, match="privacy.clip_norm must be > 0"):
        parser.instantiate_classes(
            parser.parse_args(
                [
                    "--privacy.level",
                    "client",
                    "--privacy.noise_multiplier",
                    "1",
                    "--privacy.clip_norm",
                    "0",
                ]
            )  # fmt: skip
        )
