"""Data path syntax and the existence check (torch-free)."""

from __future__ import annotations

import pytest

from flora_lightning.data.source_spec import SourceSpec, check_source_exists, parse_source


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("sites/a", SourceSpec("imagefolder", "sites/a")),
        ("data/a.parquet", SourceSpec("parquet", "data/a.parquet")),
        ("data/*.parquet", SourceSpec("parquet", "data/*.parquet")),
        ("hub:uoft-cs/cifar10", SourceSpec("hub", "uoft-cs/cifar10", "train")),
        ("hub:flora-offline/digits:test", SourceSpec("hub", "flora-offline/digits", "test")),
    ],
)
def test_parse_source(spec, parsed):
    assert parse_source(spec, "data-path") == parsed


@pytest.mark.parametrize("spec", ["", "  ", "hub:", "hub::test"])
def test_an_empty_path_or_hub_id_is_refused(spec):
    with pytest.raises(ValueError, match=r"^data-path="):
        parse_source(spec, "data-path")


def test_missing_local_paths_are_named(tmp_path):
    field = "data.partition.client_dirs[2]"
    with pytest.raises(ValueError, match=r"client_dirs\[2\]='.*nope': no such directory"):
        check_source_exists(str(tmp_path / "nope"), field)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_source_exists(str(tmp_path / "f.png"), field)
    with pytest.raises(ValueError, match="no such parquet file"):
        check_source_exists(str(tmp_path / "a.parquet"), field)
    with pytest.raises(ValueError, match="no file matches this glob"):
        check_source_exists(str(tmp_path / "*.parquet"), field)
    (tmp_path / "a.parquet").write_bytes(b"x")
    assert check_source_exists(str(tmp_path / "*.parquet"), field).kind == "parquet"
    assert check_source_exists(str(tmp_path), field).kind == "imagefolder"
    assert check_source_exists("hub:x/y", field).kind == "hub"  # the hub is not checked here
