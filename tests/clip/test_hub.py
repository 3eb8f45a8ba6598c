"""Hub fail-fast: with the hub unreachable (offline mode off), nothing but the one probe touches
the network; a cached dataset snapshot still loads, a model or dataset that is not cached fails
with the clear error."""

from __future__ import annotations

import socket

import huggingface_hub.constants
import pytest
from huggingface_hub.utils import build_hf_headers

from flora_lightning.clip import hub


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """Offline mode off, the hub cache empty in ``tmp_path``; every outgoing connection is
    refused and recorded (the reachability probe included)."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"no network in this test ({address})")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    # huggingface_hub fetches its user-agent registry once per process (one request, no
    # retries) when it first builds headers: do that now, so only loading is counted.
    build_hf_headers()
    attempts.clear()
    hub.hub_reachable.cache_clear()
    yield attempts
    hub.hub_reachable.cache_clear()


def test_local_paths_never_probe_the_hub(unreachable_hub, tmp_path):
    assert not hub.local_files_only(str(tmp_path))
    assert hub.dataset_path(str(tmp_path)) == str(tmp_path)
    assert hub.dataset_path("parquet") == "parquet"  # a packaged builder, not a hub id
    assert unreachable_hub == []


def test_model_loads_from_local_files_only(unreachable_hub):
    from flora_lightning.clip.backbone import ModelNotAvailableError, load_clip

    assert hub.local_files_only("openai/clip-vit-base-patch32")
    with pytest.raises(ModelNotAvailableError) as err:
        load_clip("openai/clip-vit-base-patch32")
    assert str(err.value).startswith("model.name_or_path")
    assert "--model.name_or_path DIR" in str(err.value)
    assert len(unreachable_hub) == 1  # the probe only: from_pretrained did not try the network


def test_dataset_not_cached_fails_without_the_network(unreachable_hub):
    from flora_lightning.data.source import DatasetNotAvailableError, load_source

    with pytest.raises(DatasetNotAvailableError) as err:
        load_source("uoft-cs/cifar10")
    message = str(err.value)
    assert message.startswith("data.dataset: could not load dataset 'uoft-cs/cifar10'")
    assert "LocalEntryNotFoundError" in message and "--data.dataset DIR" in message
    assert len(unreachable_hub) == 1


def test_cached_dataset_snapshot_loads(unreachable_hub, tmp_path):
    """A dataset ``datasets`` once downloaded sits in the hub cache: it loads from there."""
    import datasets

    commit = "0" * 40
    repo = tmp_path / "hub" / "datasets--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    for split, labels in (("train", [0, 1, 1]), ("test", [1, 0])):
        rows = {"x": list(range(len(labels))), "label": labels}
        datasets.Dataset.from_dict(rows).to_parquet(str(data / f"{split}-00000-of-00001.parquet"))

    from flora_lightning.data.source import load_source

    assert hub.dataset_path("someone/tiny") == str(repo / "snapshots" / commit)
    loaded = load_source("someone/tiny")
    assert sorted(loaded) == ["test", "train"]
    assert loaded["train"]["label"] == [0, 1, 1] and loaded["test"]["label"] == [1, 0]
    assert len(unreachable_hub) == 1
