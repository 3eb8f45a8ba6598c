"""NodeRoster: its waits are finite and non-negative, named by their run-config key."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flwr")

from flora_lightning.flower.nodes import NodeRoster  # noqa: E402


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_node_wait_is_refused(value):
    """With ``wait_seconds`` NaN, ``wait_for``'s deadline test ``now >= deadline`` is never true:
    the server would wait for a dead node for ever."""
    with pytest.raises(ValueError, match=r"^node-wait-seconds must be a finite number"):
        NodeRoster(wait_seconds=value)


def test_a_negative_node_wait_and_bad_timeouts_are_refused():
    with pytest.raises(ValueError, match=r"^node-wait-seconds must be >= 0 \(got -1\)"):
        NodeRoster(wait_seconds=-1)
    with pytest.raises(ValueError, match=r"^NodeRoster query_timeout must be a finite number"):
        NodeRoster(query_timeout=math.nan)
    with pytest.raises(ValueError, match=r"^NodeRoster poll_seconds must be >= 0"):
        NodeRoster(poll_seconds=-1.0)
    assert NodeRoster(wait_seconds=0).wait_seconds == 0
