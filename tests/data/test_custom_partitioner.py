"""A partitioner defined here, outside the package, selected by ``data.partition.partitioner``."""

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from flora_lightning.data.partition import PartitionConfig, partition_indices


class ModuloPartitioner(Partitioner):
    """Partition ``i`` holds the rows whose label is ``i`` modulo the number of partitions.

    Args:
        num_partitions: Number of partitions.
        partition_by: Label column.
        max_per_partition: Keep at most this many rows per partition (the first ones).
    """

    def __init__(self, num_partitions: int, partition_by: str, max_per_partition: int) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._max = max_per_partition

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        labels = np.asarray(self.dataset[self._partition_by][:])
        rows = np.flatnonzero(labels % self._num_partitions == partition_id)
        return self.dataset.select(rows[: self._max])


QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
CLASS_PATH = f"{ModuloPartitioner.__module__}.{ModuloPartitioner.__qualname__}"
LABELS = np.repeat(np.arange(10), 50)


def test_partition_indices_uses_the_partitioner_with_num_clients_and_init_args():
    config = PartitionConfig(
        num_clients=5,
        partitioner={"class_path": CLASS_PATH, "init_args": {"max_per_partition": 30}},
    )
    parts = partition_indices(LABELS, 10, config)
    assert [p.size for p in parts] == [30] * 5
    for client, idx in enumerate(parts):
        assert set(np.unique(LABELS[idx])) <= {client, client + 5}


def test_fit_runs_a_round_with_a_partitioner_from_the_command_line(offline_assets, tmp_path):
    from flora_lightning.stages import fit, stage_parser

    partitioner = {"class_path": CLASS_PATH, "init_args": {"max_per_partition": 40}}
    args = [
        "--config",
        QUICKSTART,
        "--data.partition.partitioner",
        json.dumps(partitioner),
        "--trainer.rounds",
        "1",
        "--trainer.max_local_steps",
        "2",
        "--trainer.progress",
        "false",
        "--data.max_test_samples",
        "64",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    parsed = stage_parser("fit").parse_args(args).data.partition
    assert parsed.partitioner == partitioner
    assert parsed.num_clients == 5

    summary = fit(args)

    assert len(summary["rounds"]) == 2  # round 0 (evaluation) and round 1
    rows = (tmp_path / "run" / "label_table.txt").read_text().splitlines()
    counts = np.array([[int(c) for c in row.split()[1:]] for row in rows[1:6]])
    assert counts[:, 0].tolist() == [40] * 5  # the totals: max_per_partition each
    per_class = counts[:, 1:]
    for client in range(5):
        held = set(np.flatnonzero(per_class[client]).tolist())
        assert held and held <= {client, client + 5}
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    assert CLASS_PATH in config_yaml


@pytest.mark.parametrize(
    ("partitioner", "message"),
    [
        (
            {"class_path": "collections.OrderedDict"},
            "data.partition.partitioner.class_path 'collections.OrderedDict' is not a "
            "flwr_datasets.partitioner.Partitioner subclass",
        ),
        (
            {"class_path": "no_such_module.Splitter"},
            "data.partition.partitioner.class_path 'no_such_module.Splitter' cannot be imported",
        ),
        ({"init_args": {}}, "data.partition.partitioner needs a class_path"),
        (
            {"class_path": CLASS_PATH, "init_args": {"num_partitions": 3}},
            "data.partition.partitioner.init_args.num_partitions is set from "
            "data.partition.num_clients",
        ),
    ],
)
def test_bad_partitioner_is_rejected_naming_the_field(partitioner, message):
    with pytest.raises(ValueError) as err:
        PartitionConfig(partitioner=partitioner)
    assert message in str(err.value)


def test_cli_rejects_a_class_path_that_is_not_a_partitioner(offline_assets):
    from flora_lightning.stages import stage_parser

    parser = stage_parser("fit")
    config = parser.parse_args(
        [
            "--config",
            QUICKSTART,
            "--data.partition.partitioner",
            '{"class_path": "collections.OrderedDict"}',
        ]
    )
    with pytest.raises(ValueError, match="data.partition.partitioner.class_path"):
        parser.instantiate_classes(config)
