"""``data.partition`` checks: kind=folders fields and finite floats (torch-free)."""

from __future__ import annotations

import math

import pytest

from flora_lightning.data.partition_config import PartitionConfig

P = "data.partition."


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_beta_must_be_finite(value):
    # inf passed the old `not beta > 0` check and reached the Dirichlet draw
    with pytest.raises(ValueError, match=rf"^{P}beta must be a finite number \(got {value}\)"):
        PartitionConfig(kind="dirichlet", beta=value)


def test_folders_needs_client_dirs():
    with pytest.raises(ValueError, match=rf"{P}kind=folders needs {P}client_dirs"):
        PartitionConfig(kind="folders")
    with pytest.raises(ValueError, match=rf"{P}client_dirs must be a non-empty list"):
        PartitionConfig(kind="folders", num_clients=0, client_dirs=[])


def test_folders_num_clients_is_the_number_of_paths():
    assert PartitionConfig(kind="folders", num_clients=3, client_dirs=["a", "b", "c"])
    with pytest.raises(ValueError, match=rf"{P}num_clients=10 but {P}client_dirs lists 3 paths"):
        PartitionConfig(kind="folders", client_dirs=["a", "b", "c"])


def test_folders_refuses_a_path_given_twice_and_a_partitioner():
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        PartitionConfig(kind="folders", num_clients=3, client_dirs=["a", "b", "a"])
    with pytest.raises(ValueError, match=rf"{P}partitioner draws partitions"):
        PartitionConfig(
            kind="folders",
            num_clients=1,
            client_dirs=["a"],
            partitioner={"class_path": "flwr_datasets.partitioner.IidPartitioner"},
        )


def test_client_test_dirs_one_per_client():
    with pytest.raises(
        ValueError, match=rf"{P}client_test_dirs must list one test path per client, 2"
    ):
        PartitionConfig(
            kind="folders", num_clients=2, client_dirs=["a", "b"], client_test_dirs=["t"]
        )


def test_client_dirs_only_with_kind_folders():
    with pytest.raises(ValueError, match=rf"{P}client_dirs is read only with {P}kind=folders"):
        PartitionConfig(kind="iid", client_dirs=["a"])
