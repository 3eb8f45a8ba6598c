"""Strategy base: updates are checked once, then the subclass's hooks run on accepted ones."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.strategy import ClientUpdate, State, Strategy


class LastAccepted(Strategy):
    """A strategy that does not derive from FedAvg: the last accepted update wins."""

    def start_round(self, global_state: State) -> None:
        self.seen: list[int] = []
        self.last: State = {}

    def accumulate(self, update: ClientUpdate) -> None:
        self.seen.append(update.client_id)
        self.last = update.state

    def aggregate(self) -> State:
        return dict(self.last)


def update(client: int, value: float, num_samples: int = 5, shape=(2,)) -> ClientUpdate:
    state = {"w": torch.full(shape, value)}
    return ClientUpdate(client_id=client, state=state, num_samples=num_samples, train_loss=0.0)


def test_only_checked_updates_reach_the_subclass_with_reasons_recorded():
    strategy = LastAccepted(min_clients=1)
    strategy.begin({"w": torch.zeros(2)})
    assert strategy.add(update(0, 1.0))
    assert not strategy.add(update(1, float("nan")))
    assert not strategy.add(update(2, 2.0, shape=(3,)))
    assert not strategy.add(update(3, 2.0, num_samples=0))
    bad_names = ClientUpdate(client_id=4, state={"v": torch.ones(2)}, num_samples=1, train_loss=0)
    assert not strategy.add(bad_names)
    assert strategy.seen == [0] and strategy.accepted == [0]
    assert strategy.rejected == {
        1: "tensor w holds NaN or Inf",
        2: "tensor w has shape (3,)",
        3: "it reports 0 samples",
        4: "its tensor names differ from the global state",
    }
    assert torch.equal(strategy.result()["w"], torch.ones(2))
    strategy.begin({"w": torch.zeros(2)})  # a new round forgets the last one's verdicts
    assert strategy.accepted == [] and strategy.rejected == {}


def test_result_with_too_few_accepted_raises_before_aggregate():
    strategy = LastAccepted(min_clients=2)
    strategy.begin({"w": torch.zeros(2)})
    strategy.add(update(0, 1.0))
    with pytest.raises(RuntimeError, match="only 1 client update"):
        strategy.result()
