"""federation/settings.py: its float fields refuse NaN and Inf, naming the dotted field."""

from __future__ import annotations

import math

import pytest

from flora_lightning.federation.settings import RankTier, check_settings

GOOD = dict(rounds=1, local_epochs=1, max_local_steps=None, join_ratio=1.0,
            precision="32-true", resume_every_n_rounds=1, keep_last_checkpoints=None,
            on_client_error="skip")  # fmt: skip


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True])
def test_join_ratio_must_be_a_finite_share(value):
    with pytest.raises(ValueError, match=r"trainer.join_ratio must be in \(0, 1\]"):
        check_settings(**{**GOOD, "join_ratio": value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_rank_tier_share_must_be_finite(value):
    with pytest.raises(ValueError, match=r"a tier's share must be in \(0, 1\]"):
        RankTier(rank=2, share=value)


def test_good_settings_pass():
    check_settings(**GOOD)
    assert RankTier(rank=1, share=0.5).share == 0.5
