"""``trainer.availability`` in a run: dropped and straggling clients, seeded and recorded."""

from __future__ import annotations

import math

from flora_lightning.callbacks import Callback
from flora_lightning.federation.availability import Availability


class CountSteps(Callback):
    """Counts each client's local steps per round (wrapping the model's training_step)."""

    def __init__(self, model) -> None:
        self.steps: dict[tuple[int, int], int] = {}
        self.current = None
        step = model.training_step

        def counted(*args, **kwargs):
            self.steps[self.current] = self.steps.get(self.current, 0) + 1
            return step(*args, **kwargs)

        model.training_step = counted

    def on_client_fit_start(self, loop, model, client_id) -> None:
        self.current = (loop.round, client_id)


def test_dropouts_and_stragglers_follow_the_seeded_draws(make_flora, make_datamodule, make_loop):
    availability = Availability(dropout=0.3, straggler=0.5, straggler_fraction=0.5)
    model, data = make_flora(), make_datamodule()
    loop = make_loop(rounds=4, max_local_steps=4, availability=availability)
    counter = CountSteps(model)
    loop.callbacks.append(counter)
    summary = loop.fit(model, data)

    seen = {"dropped": 0, "straggler": 0, "trained": 0}
    for record in summary["rounds"][1:]:
        round_ = record["round"]
        for client in range(3):
            full = min(4, math.ceil(data.num_samples(client) / 32))
            event = availability.draw(42, round_, client, full)  # the same draw, independently
            seen[event.kind] += 1
            if event.dropped:
                assert record["dropped_clients"][str(client)] == "dropout"
                assert (round_, client) not in counter.steps
                assert client not in record["accepted_clients"]
            else:
                assert counter.steps[(round_, client)] == event.steps
                assert client in record["accepted_clients"]
                if event.kind == "straggler":
                    assert record["straggler_clients"][str(client)] == event.steps == 2
                else:
                    assert str(client) not in record["straggler_clients"]
    assert min(seen.values()) > 0  # this seed exercises all three kinds


def test_a_round_with_every_client_dropped_keeps_the_global_state(
    make_flora, make_datamodule, make_loop
):
    loop = make_loop(rounds=2, availability=Availability(dropout=1.0))
    summary = loop.fit(make_flora(), make_datamodule())
    for record in summary["rounds"][1:]:
        assert record["accepted_clients"] == []
        assert record["dropped_clients"] == {"0": "dropout", "1": "dropout", "2": "dropout"}
        assert record["bytes_up"] == 0
        assert record["test_acc"] == summary["rounds"][0]["test_acc"]


def test_a_deadline_drops_slow_clients(make_flora, make_datamodule, make_loop):
    availability = Availability(deadline=1.5, speed_spread=1.0)
    data = make_datamodule()
    loop = make_loop(rounds=1, max_local_steps=2, availability=availability)
    summary = loop.fit(make_flora(), data)
    record = summary["rounds"][1]
    assert sorted(record["dropped_clients"]) == ["0", "2"]  # 2 s/step > 1.5 s: late
    assert record["accepted_clients"] == [1]
    for client in range(3):
        late = 2 * availability.seconds_per_step(42, client) > 1.5
        assert (record["dropped_clients"].get(str(client)) == "deadline") == late
