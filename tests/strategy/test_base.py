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


class Sum(Strategy):
    """Sums the updates in float64: two float32 values of 3e38 give 6e38, finite in float64 and
    Inf once stored in the global state's float32."""

    def start_round(self, global_state: State) -> None:
        self.total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}

    def accumulate(self, update: ClientUpdate) -> None:
        for name, tensor in update.state.items():
            self.total[name] += tensor.double()

    def aggregate(self) -> State:
        return dict(self.total)


def test_an_aggregate_that_overflows_the_global_dtype_is_refused():
    strategy = Sum(min_clients=2)
    strategy.begin({"w": torch.zeros(2)})
    assert strategy.add(update(0, 3e38)) and strategy.add(update(1, 3e38))
    assert torch.isfinite(strategy.aggregate()["w"]).all()  # finite in float64...
    assert strategy.finish_round() is None  # ...not in float32: the round is not aggregated
    assert strategy.accepted == []
    assert strategy.rejected == {0: "the aggregate's tensor w holds NaN or Inf in torch.float32",
                                 1: "the aggregate's tensor w holds NaN or Inf in torch.float32"}  # fmt: skip
    with pytest.raises(RuntimeError, match="only 0 client update"):
        strategy.result()
    # a finite round goes through finish_round, then result hands out the same state
    strategy.begin({"w": torch.zeros(2)})
    assert strategy.add(update(0, 1.0)) and strategy.add(update(1, 2.0))
    finished = strategy.finish_round()
    assert torch.equal(finished["w"], torch.full((2,), 3.0, dtype=torch.float64))
    assert strategy.result() is finished


def test_sample_counts_are_bounded():
    strategy = LastAccepted(max_num_samples=100)
    strategy.begin({"w": torch.zeros(2)})
    assert strategy.add(update(0, 1.0, num_samples=100))
    assert not strategy.add(update(1, 1.0, num_samples=101))
    assert "max_num_samples=100" in strategy.rejected[1]
    assert not strategy.add(update(2, 1.0, num_samples=True))
    assert not strategy.add(update(0, 1.0))  # client 0 already sent its update
    strategy.known_num_samples = {3: 40}.get  # a server that knows client 3's partition
    assert not strategy.add(update(3, 1.0, num_samples=41))
    assert strategy.rejected[3] == "it reports 41 samples; its partition holds 40"
    assert strategy.add(update(3, 1.0, num_samples=40))
    with pytest.raises(ValueError, match="trainer.strategy.max_num_samples"):
        LastAccepted(max_num_samples=0)


def test_updates_in_another_dtype_are_refused():
    strategy = LastAccepted()
    strategy.begin({"w": torch.zeros(2)})
    wide = ClientUpdate(0, {"w": torch.full((2,), 1e39, dtype=torch.float64)}, 5, 0.0)
    assert not strategy.add(wide)
    assert strategy.rejected[0] == "tensor w has dtype torch.float64, not torch.float32"


def test_every_strategy_takes_max_num_samples():
    """``trainer.strategy.init_args.max_num_samples`` works for every exported strategy: an
    update claiming more samples than the bound is refused with a reason naming it."""
    import inspect

    import torch

    import flora_lightning.strategy as strategies
    from flora_lightning.privacy.client_dp import DPFedAvg
    from flora_lightning.strategy import ClientUpdate, Strategy

    classes = [
        c
        for c in vars(strategies).values()
        if inspect.isclass(c) and issubclass(c, Strategy) and not inspect.isabstract(c)
    ]
    classes.append(DPFedAvg)  # fmt: skip
    required = {DPFedAvg: dict(noise_multiplier=0.0, clip_norm=1.0, num_sampled_clients=1)}
    state = {"w": torch.zeros(2)}
    for cls in classes:
        strategy = cls(max_num_samples=10, **required.get(cls, {}))
        assert strategy.max_num_samples == 10, cls.__name__
        strategy.begin(state)
        strategy.add(ClientUpdate(0, {"w": torch.ones(2)}, 11, 0.0))
        assert "0" in strategy.rejected or 0 in strategy.rejected, cls.__name__
