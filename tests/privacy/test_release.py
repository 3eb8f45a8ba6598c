"""What a private run releases beyond epsilon, and partitions its accounting cannot cover."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flora_lightning.data.partition import PartitionConfig
from flora_lightning.privacy import PrivacyConfig
from flora_lightning.privacy.run import refuse_shared_records

CLIENT_DP = dict(level="client", noise_multiplier=0.5, clip_norm=1.0)


def tensorboard_tags(run_dir) -> set[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize("log_client_stats", [False, True])
def test_client_losses_and_label_counts_stay_out_of_a_private_runs_outputs(
    make_flora, make_datamodule, make_loop, log_client_stats
):
    loop = make_loop(rounds=1)
    loop.use_privacy(PrivacyConfig(**CLIENT_DP, log_client_stats=log_client_stats))
    data = make_datamodule()
    summary = loop.fit(make_flora(), data)

    trained = summary["rounds"][1]
    table = (loop.run_dir / "label_table.txt").read_text()
    tags = tensorboard_tags(loop.run_dir)
    saved = json.loads((loop.run_dir / "summary.json").read_text())["rounds"][1]
    if log_client_stats:  # asked for: written as without DP
        assert set(trained["client_train_loss"]) == {"0", "1", "2"}
        assert table.strip() == data.label_table().strip()
        assert "client/0/train_loss" in tags and "train/loss" in tags
    else:
        assert trained["client_train_loss"] == {} == saved["client_train_loss"]
        assert table.startswith("withheld") and "privacy.log_client_stats" in table
        assert not any("train_loss" in tag or tag == "train/loss" for tag in tags)
    assert "privacy/epsilon" in tags and "test/acc" in tags  # the rest is still written


def test_without_dp_client_stats_are_written(make_flora, make_datamodule, make_loop):
    loop = make_loop(rounds=1)
    loop.use_privacy(PrivacyConfig())
    summary = loop.fit(make_flora(), make_datamodule())
    assert set(summary["rounds"][1]["client_train_loss"]) == {"0", "1", "2"}
    assert not (loop.run_dir / "label_table.txt").read_text().startswith("withheld")


def test_sample_level_refuses_overlapping_fewshot_partitions(
    make_flora, make_datamodule, make_loop
):
    # 3 clients draw 5 shots of each of the 10 digits independently (the released default):
    # some records are held by several clients, and each would go through several DP-SGD runs.
    overlap = PartitionConfig(kind="fewshot", num_clients=3, shots=5, shots_overlap=True, seed=0)
    data = make_datamodule(partition=overlap)
    loop = make_loop(rounds=1)
    loop.use_privacy(PrivacyConfig(level="sample", noise_multiplier=1.0))
    with pytest.raises(ValueError, match=r"privacy.level=sample.*data.partition.shots_overlap"):
        loop.fit(make_flora(), data)
    assert not (loop.run_dir / "summary.json").exists()
    # the same shots without overlap are accepted
    disjoint = PartitionConfig(kind="fewshot", num_clients=3, shots=5, shots_overlap=False, seed=0)
    data = make_datamodule(partition=disjoint)
    loop = make_loop(rounds=1, run="disjoint")
    loop.use_privacy(PrivacyConfig(level="sample", noise_multiplier=1.0))
    assert "privacy" in loop.fit(make_flora(), data)


def test_shared_records_are_counted_from_the_partitions():
    refuse_shared_records([np.arange(5), np.arange(5, 9)])  # disjoint: fine
    with pytest.raises(ValueError, match=r"\(2 records belong to more than one client, up to 3\)"):
        refuse_shared_records([np.array([0, 1, 2]), np.array([1, 3]), np.array([1, 2])])
