"""Which client a node plays and where its data comes from (node config + run config)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flora_lightning.flower.node_data import NodeData, node_data
from flora_lightning.flower.server_data import NOT_SHARED, ServerSideData

IID = SimpleNamespace(num_clients=3, kind="iid", client_dirs=None, client_test_dirs=None)
FOLDERS = SimpleNamespace(num_clients=2, kind="folders", client_dirs=["a", "b"],
                          client_test_dirs=["ta", "tb"])  # fmt: skip


def test_a_simulated_partition_and_a_node_with_its_own_data():
    assert node_data({"partition-id": 2, "num-partitions": 3}, False, IID) == NodeData(2)
    own = {"data-path": "/site", "client-id": "1", "share-label-counts": "true"}
    assert node_data(own, True, IID) == NodeData(1, "/site", None, True)
    # the simulation engine with kind: folders: virtual node k reads client_dirs[k] only
    assert node_data({"partition-id": 1}, True, FOLDERS) == NodeData(
        1, "b", "tb", False, ("data.partition.client_dirs[1]", "data.partition.client_test_dirs[1]")
    )


@pytest.mark.parametrize(
    ("config", "node_data_run", "partition", "message"),
    [
        ({"data-path": "/s", "client-id": 0}, False, IID, "node-data = true"),
        ({"data-path": "/s", "client-id": 0, "partition-id": 0}, True, IID, "not both"),
        ({"data-path": "/s"}, True, IID, "needs client-id"),
        (
            {"data-path": "/s", "client-id": 3},
            True,
            IID,
            r"client-id=3 must be an integer in \[0, 3\)",
        ),
        ({"data-path": "/s", "client-id": "1.5"}, True, IID, "client-id='1.5'"),
        ({}, True, IID, "no partition-id and no data-path"),
        ({}, False, IID, "no partition-id"),
        ({"partition-id": 0}, True, IID, "has no data-path"),
        ({"partition-id": 0, "num-partitions": 4}, False, IID, "num-partitions=4"),
        ({"partition-id": 0, "share-label-counts": "maybe"}, False, IID, "share-label-counts"),
    ],
)
def test_bad_node_configs_name_the_key(config, node_data_run, partition, message):
    with pytest.raises(ValueError, match=message):
        node_data(config, node_data_run, partition)


class _Data:
    class_names = ["cat", "dog"]
    partition = SimpleNamespace(num_clients=3)
    opened = []

    def setup_server(self):
        self.opened.append("test set")

    def setup(self, stage=None):
        raise AssertionError("the server must not open the training data")


def test_server_side_data_opens_the_test_set_only_and_shows_what_was_shared():
    data = ServerSideData(_Data())
    data.setup("fit")
    assert data.opened == ["test set"] and data.num_clients == 3
    data.shared.update({0: (7, [3, 4]), 2: (5, [1, 2, 2])})
    rows = data.label_table().splitlines()
    assert rows[1].split() == ["0", "7", "3", "4"]
    assert NOT_SHARED in rows[2]
    assert "not one per class" in rows[3]  # a node's malformed counts are not shown as counts
    assert data.num_samples(0) == 7
    with pytest.raises(ValueError, match="known only to its node"):
        data.num_samples(1)
