"""data.local_test_fraction: seeded per-client local test sets, out of the clients' training data."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.data.label_table import format_label_table
from flora_lightning.data.partition import PartitionConfig


def test_local_test_sets_split_each_partition(make_datamodule):
    whole = make_datamodule()
    whole.setup()
    data = make_datamodule(local_test_fraction=0.25)
    data.setup()
    assert data.has_local_test and not whole.has_local_test
    for client in range(3):
        partition = whole.client_indices[client]
        train, test = data.client_indices[client], data.client_test_indices[client]
        assert len(test) == int(0.25 * len(partition))
        assert data.num_samples(client) == len(train) == len(partition) - len(test)
        assert not set(train) & set(test)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(partition))
        # Both parts keep the partition's order.
        order = {row: i for i, row in enumerate(partition)}
        assert all(np.diff([order[row] for row in train]) > 0)
        assert all(np.diff([order[row] for row in test]) > 0)
        # Seeded per (data.partition.seed, client): an int(f * n) draw of the positions.
        rng = np.random.default_rng([42, client, 7])
        positions = np.sort(rng.choice(len(partition), size=len(test), replace=False))
        assert np.array_equal(test, partition[positions])


def test_overlapping_fewshot_local_test_rows_are_no_other_clients_training_rows(
    make_datamodule,
):
    # The released IID few-shot split: clients draw their 16 shots a class independently, so
    # two clients may hold the same row; a local test row must not be another's training row.
    partition = PartitionConfig(kind="fewshot", num_clients=3, shots=16, seed=42)
    assert partition.shots_overlap
    data = make_datamodule(partition=partition, local_test_fraction=0.25)
    data.setup()
    train = [set(rows.tolist()) for rows in data.client_indices]
    test = [set(rows.tolist()) for rows in data.client_test_indices]
    held = [train[c] | test[c] for c in range(3)]
    assert all(len(held[c]) == 160 for c in range(3))  # 16 shots x 10 digits
    assert held[0] & held[1] and held[1] & held[2]  # the partitions overlap
    for client in range(3):
        others_train = set().union(*(train[d] for d in range(3) if d != client))
        assert test[client], "every client keeps a local test set"
        assert not test[client] & others_train


def test_client_test_dataloader_yields_the_local_test_rows(make_datamodule, make_flora):
    data = make_datamodule(local_test_fraction=0.25, eval_batch_size=16)
    data.setup()
    data.set_image_transform(make_flora().image_transform)
    labels = np.asarray(data.train_set["label"])
    seen = torch.cat([y for _, y in data.client_test_dataloader(1)])
    assert seen.tolist() == labels[data.client_test_indices[1]].tolist()
    assert data.test_counts[1].sum() == len(seen)
    assert np.array_equal(data.test_counts[1], np.bincount(seen.numpy(), minlength=10))


def test_label_table_shows_train_and_local_test_blocks(make_datamodule):
    whole = make_datamodule()
    whole.setup()
    assert whole.label_table() == format_label_table(whole.counts, whole.class_names)

    data = make_datamodule(local_test_fraction=0.25)
    data.setup()
    lines = data.label_table().splitlines()
    assert lines[0] == "train"
    local = lines.index("local test (data.local_test_fraction=0.25)")
    train_all, test_all = lines[local - 2].split(), lines[-1].split()
    assert train_all[0] == test_all[0] == "all"
    train_total, test_total = int(train_all[1]), int(test_all[1])
    assert test_total == sum(len(t) for t in data.client_test_indices)
    assert train_total + test_total == sum(whole.counts.sum(axis=1))
    # Per class, training plus local test counts give the whole partition's counts.
    assert np.array_equal(data.counts + data.test_counts, whole.counts)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(ValueError) as err:
        FederatedDataModule(local_test_fraction=fraction)
    assert str(err.value).startswith("data.local_test_fraction must be in (0, 1)")


def test_a_client_without_a_local_test_sample_is_named(make_datamodule):
    data = make_datamodule(local_test_fraction=0.001)  # every client has < 1000 samples
    with pytest.raises(ValueError) as err:
        data.setup()
    message = str(err.value)
    assert message.startswith("data.local_test_fraction=0.001 leaves client 0 (")
    assert "samples) with no local test sample" in message


def test_client_test_loader_needs_the_fraction(make_datamodule):
    data = make_datamodule()
    data.setup()
    with pytest.raises(ValueError, match="data.local_test_fraction is null"):
        data.client_test_dataloader(0)


def test_feature_cache_encodes_local_test_sets(make_datamodule, make_flora, tmp_path):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = make_datamodule(local_test_fraction=0.25)
    data.setup()
    model = make_flora()  # LoRA on the text tower: the image encoder is frozen
    model.configure_task(data.class_names, data.template)
    data.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    cache = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
    cache.build([0, 2], test=False)

    x, y = next(iter(cache.client_test_dataloader(2)))
    rows = data.client_test_dataset(2)
    pixels, labels = data.collate([rows[i] for i in range(len(x))])
    with torch.no_grad(), fabric.autocast():
        expected = model.frozen_image_features(pixels).float()
    assert torch.equal(y, labels)
    torch.testing.assert_close(x, expected)
    assert len(cache.features["local_test/0"][0]) == len(data.client_test_indices[0])
    assert len(cache.features["0"][0]) == data.num_samples(0)
    with pytest.raises(KeyError, match="client 1's local test set is not cached"):
        cache.client_test_dataloader(1)

    # Read back from disk: the same local test features.
    reread = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
    reread.build([0, 2], test=False)
    assert torch.equal(reread.features["local_test/2"][0], cache.features["local_test/2"][0])
