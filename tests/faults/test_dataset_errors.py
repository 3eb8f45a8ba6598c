"""Dataset loading failures keep their cause: "not available" only when it is not available."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flora_lightning.data import source
from flora_lightning.data.source import DataFileError, DatasetNotAvailableError, load_source


def good_parquet(path: Path) -> Path:
    table = pa.table({"label": list(range(20)), "text": [f"row {i}" for i in range(20)]})
    pq.write_table(table, path)
    return path


def garbage(tmp: Path) -> Path:
    path = tmp / "train.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    return path


def truncated(tmp: Path) -> Path:
    path = good_parquet(tmp / "train.parquet")
    path.write_bytes(path.read_bytes()[:-40])
    return path


@pytest.mark.parametrize("damage", [garbage, truncated])
@pytest.mark.parametrize("how", ["data_files", "folder"])
def test_a_corrupt_parquet_is_named_not_called_unavailable(tmp_path, damage, how):
    bad = damage(tmp_path)
    good_parquet(tmp_path / "test.parquet")
    if how == "data_files":
        files = {"train": str(bad), "test": str(tmp_path / "test.parquet")}
        call = lambda: load_source("parquet", data_files=files)  # noqa: E731
    else:
        call = lambda: load_source(str(tmp_path))  # noqa: E731
    with pytest.raises(DataFileError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"data: {bad} is not a readable parquet file (")
    assert "could not load dataset" not in message and "\n" not in message
    assert info.value.__cause__ is not None  # pyarrow's own error is kept


@pytest.mark.parametrize(
    ("dataset", "kwargs", "expected"),
    [
        ("someone/not-here-offline", {}, "data.dataset: could not load dataset"),
        ("parquet", {"data_files": {"train": "/nonexistent/a.parquet"}}, "Check the folder"),
        ("imagefolder", {"data_dir": "/nonexistent/images"}, "Check the folder"),
    ],
    ids=["hub-offline", "missing-file", "missing-folder"],
)
def test_missing_data_is_not_available(dataset, kwargs, expected):
    with pytest.raises(DatasetNotAvailableError) as info:
        load_source(dataset, **kwargs)
    assert expected in str(info.value)


def test_unrelated_failures_keep_their_type(tmp_path, monkeypatch):
    """A bug inside loading (here: a KeyError) is not relabelled as 'could not load'."""
    import datasets

    def buggy(*args, **kwargs):
        return {}["features"]

    monkeypatch.setattr(datasets, "load_dataset", buggy)
    with pytest.raises(KeyError, match="features"):
        load_source("parquet", data_files={"train": str(good_parquet(tmp_path / "a.parquet"))})


def test_not_available_errors_do_not_include_generic_ones():
    errors = source.not_available_errors()
    for generic in (Exception, ValueError, RuntimeError, OSError, KeyError):
        assert generic not in errors
    assert FileNotFoundError in errors and ConnectionError in errors
