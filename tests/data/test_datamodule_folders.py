"""``data.partition.kind: folders``: client k holds client_dirs[k]; a node and a server alone.

Which image a row holds is read from its file name (the writer names each file after its row
in the digits' train split), and the expected labels from the digits' parquet file: both
independent of the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flora_lightning.data import datamodule as datamodule_module
from flora_lightning.data import owners as owners_module
from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.data.partition_config import PartitionConfig
from flora_lightning.offline.digits import CLASS_NAMES, digits_data_files


def folders(dirs: list, **kwargs) -> PartitionConfig:
    """``kind=folders`` over ``dirs`` (one client per path)."""
    return PartitionConfig(kind="folders", num_clients=len(dirs), client_dirs=dirs, **kwargs)


@pytest.fixture(scope="module")
def sites(tmp_path_factory, offline_assets) -> tuple[list[Path], Path]:
    from flora_lightning.offline.site_folders import TEST_FOLDER, write_site_folders

    root = tmp_path_factory.mktemp("sites")
    return write_site_folders(root, 3, seed=5, max_per_site=50), root / TEST_FOLDER


def _data(partition: PartitionConfig, **overrides) -> FederatedDataModule:
    kwargs = dict(
        dataset="flora-offline/digits",
        image_column="image",
        label_column="label",
        class_names=CLASS_NAMES,
        template="a photo of the digit {}.",
        test_split="test",
        batch_size=8,
        partition=partition,
    )
    return FederatedDataModule(**{**kwargs, **overrides})


def _files(rows) -> list[str]:
    return [Path(image.filename).name for image in rows["image"]]


def _truth() -> np.ndarray:
    return np.asarray(pq.read_table(digits_data_files()["train"])["label"].to_pylist())


def test_client_k_holds_client_dirs_k(sites):
    dirs, test = sites
    data = _data(folders([str(d) for d in dirs]), test_dataset=str(test))
    data.setup()
    truth = _truth()
    assert data.num_clients == 3
    for k, folder in enumerate(dirs):
        rows = data.client_dataset(k)
        names = _files(rows)
        assert sorted(names) == sorted(p.name for p in folder.rglob("*.png"))
        expected = [truth[int(Path(n).stem)] for n in names]
        assert rows["label"] == expected
        num, counts = data.client_report(k)
        assert num == 50
        np.testing.assert_array_equal(counts, np.bincount(expected, minlength=10))
    assert len(data.test_set) == pq.read_metadata(digits_data_files()["test"]).num_rows


def test_a_node_trains_on_the_rows_its_twin_client_gets(sites):
    dirs, test = sites
    twin = _data(
        folders([str(d) for d in dirs], seed=7),
        test_dataset=str(test),
        local_test_fraction=0.2,
    )
    twin.setup()
    node = _data(PartitionConfig(num_clients=3, seed=7), local_test_fraction=0.2)
    node.setup_node(str(dirs[1]), client=1)
    assert node.test_set is None and node.train_set is not None
    assert [len(i) for i in node.client_indices] == [0, 40, 0]  # 50 - int(0.2 * 50)
    assert _files(node.client_dataset(1)) == _files(twin.client_dataset(1))
    assert _files(node.client_test_dataset(1)) == _files(twin.client_test_dataset(1))
    assert len(twin.client_test_dataset(1)) == 10
    assert node.client_report(1)[0] == twin.client_report(1)[0] == 40
    np.testing.assert_array_equal(node.client_report(1)[1], twin.client_report(1)[1])
    # a different client index draws other local test rows (the seed is (seed, client))
    other = _data(PartitionConfig(num_clients=3, seed=7), local_test_fraction=0.2)
    other.setup_node(str(dirs[1]), client=2)
    assert _files(other.client_test_dataset(2)) != _files(twin.client_test_dataset(1))


def test_client_test_dirs_are_the_local_test_sets(sites):
    dirs, _ = sites
    data = _data(
        folders([str(dirs[0]), str(dirs[1])], client_test_dirs=[str(dirs[2]), str(dirs[0])]),
        test_dataset="hub:flora-offline/digits:test",
    )
    data.setup()
    assert data.has_local_test
    assert sorted(_files(data.client_test_dataset(0))) == sorted(
        p.name for p in dirs[2].rglob("*.png")
    )
    assert len(data.client_dataset(0)) == 50  # test rows are not training rows
    assert "local test (the clients' test paths)" in data.label_table()


def test_a_server_opens_no_training_data(sites, monkeypatch):
    dirs, test = sites
    opened = []
    real = owners_module.load_local_source

    def recording(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    def no_dataset(*args, **kwargs):
        raise AssertionError("the server loaded data.dataset")

    monkeypatch.setattr(owners_module, "load_local_source", recording)
    monkeypatch.setattr(datamodule_module, "load_source", no_dataset)
    server = _data(folders([str(d) for d in dirs]), test_dataset=str(test))
    server.setup_server()
    assert opened == [str(test)]
    assert server.train_set is None and server.client_indices == []
    assert len(server.test_set) == pq.read_metadata(digits_data_files()["test"]).num_rows


def test_without_test_dataset_the_global_test_set_is_data_dataset_s(sites):
    dirs, _ = sites
    data = _data(folders([str(d) for d in dirs]))
    data.setup_server()
    truth = pq.read_table(digits_data_files()["test"])["label"].to_pylist()
    assert data.test_set["label"] == truth


def test_a_bad_site_names_its_field(sites, tmp_path):
    dirs, _ = sites
    bad = tmp_path / "bad"
    (bad / "seven").mkdir(parents=True)
    (bad / "seven" / "a.png").write_bytes(b"nope")
    data = _data(folders([str(dirs[0]), str(bad)]))
    with pytest.raises(ValueError, match=r"data.partition.client_dirs\[1\]=.*1 of 1 images"):
        data.setup()


def test_test_dataset_replaces_the_global_test_set_of_any_kind(sites, make_datamodule):
    _, test = sites
    data = make_datamodule(test_dataset=str(test), max_test_samples=None)
    data.setup()
    files = sorted(p.name for p in test.rglob("*.png"))
    assert sorted(_files(data.test_set)) == files
    truth = pq.read_table(digits_data_files()["test"])["label"].to_pylist()
    # the folder's files are the digits' test rows, named by row: same labels in row order
    by_row = sorted(zip(_files(data.test_set), data.test_set["label"], strict=True))
    assert [label for _, label in by_row] == truth


def test_a_node_names_its_paths_and_refuses_two_local_test_sets(sites, tmp_path):
    dirs, _ = sites
    node = _data(PartitionConfig(num_clients=3))
    with pytest.raises(ValueError, match=r"^data.partition.client_dirs\[2\]='.*nope': no such"):
        node.setup_node(str(tmp_path / "nope"), 2, fields=("data.partition.client_dirs[2]", "t"))
    both = _data(PartitionConfig(num_clients=3), local_test_fraction=0.2)
    with pytest.raises(ValueError, match="A node has a test-path and data.local_test_fraction"):
        both.setup_node(str(dirs[0]), 0, test_path=str(dirs[1]))
    server = _data(
        folders([str(d) for d in dirs]),
        class_names=["zero_x", *CLASS_NAMES[1:]],
        test_dataset="hub:flora-offline/digits:test",
    )
    with pytest.raises(ValueError, match=r"label\(s\) the run does not know: \['zero'\]"):
        server.setup_server()
