"""The memory cost model of trainer.parallel_clients and K picked from a budget."""

from __future__ import annotations

import pytest

from flora_lightning.federation.parallel_memory import (
    MB,
    ClientStepShape,
    check_parallel_settings,
    client_step_bytes,
    pick_parallel_clients,
)

# FLoRA at ViT-B/32 (text tower: 12 layers, width 512, 8 heads), 10 captions of 8 tokens
VIT_B32 = ClientStepShape(
    trainable=24_576, layers=12, width=512, heads=8, captions=10, tokens=8, rows=128,
    feature_dim=512,
)  # fmt: skip


def test_client_bytes_follow_the_stated_model():
    # by hand: per token 20*512 + 8*8 = 10304 elements saved; 12 layers x 10 captions x 8
    # tokens of those, times the measured overhead 2; head 4 x 128 x 512; Adam and friends
    # 6 x 24,576; 4 bytes each
    text = 2 * 12 * 10 * 8 * 10304
    expected = (text + 4 * 128 * 512 + 6 * 24_576) * 4
    assert client_step_bytes(VIT_B32) == expected
    # at least what was measured per added client at these shapes (61-76 MiB, CPU fp32)
    assert 76 * MB < expected < 80 * MB
    # activations scale with the captions, the adapter state is small
    twice = ClientStepShape(**{**VIT_B32.__dict__, "captions": 20})
    assert client_step_bytes(twice) - client_step_bytes(VIT_B32) == text * 4
    assert client_step_bytes(ClientStepShape(trainable=1000)) == 6 * 1000 * 4


@pytest.mark.parametrize(
    "budget_mb, per_client, clients, k",
    [(1000, 100 * MB, 10, 10), (1000, 100 * MB, 20, 10), (999, 100 * MB, 20, 9),
     (50, 100 * MB, 10, 1), (1000, 100 * MB, 3, 3)],
)  # fmt: skip
def test_pick_parallel_clients(budget_mb, per_client, clients, k):
    assert pick_parallel_clients(budget_mb, per_client, clients) == k


@pytest.mark.parametrize(
    "clients, budget, message",
    [(0, None, "trainer.parallel_clients must be"), ("many", None, "integer >= 1 or auto"),
     (True, None, "trainer.parallel_clients must be"), ("auto", 0, "parallel_memory_mb must"),
     (4, 512, "only sizes trainer.parallel_clients=auto")],
)  # fmt: skip
def test_bad_settings_name_the_field(clients, budget, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_settings(clients, budget)


def test_good_settings_pass():
    for clients, budget in ((1, None), (8, None), ("auto", None), ("auto", 4096)):
        check_parallel_settings(clients, budget)


def test_check_settings_runs_the_parallel_checks():
    from flora_lightning.federation.settings import check_settings

    base = dict(rounds=1, local_epochs=1, max_local_steps=None, join_ratio=1.0,
                precision="32-true", resume_every_n_rounds=1, keep_last_checkpoints=None,
                on_client_error="skip")  # fmt: skip
    check_settings(**base, parallel_clients="auto", parallel_memory_mb=1024)
    with pytest.raises(ValueError, match="trainer.parallel_clients must be"):
        check_settings(**base, parallel_clients=0)
