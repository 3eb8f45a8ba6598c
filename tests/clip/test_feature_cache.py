"""FeatureCache: every client's rows encoded in one pass, each part in its own batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flora_lightning.clip import feature_cache
from flora_lightning.clip.feature_cache import FEATURES_FILE, FeatureCache


@pytest.mark.parametrize("preprocess", ["processor", "device"])
def test_one_pass_over_all_clients_equals_each_client_alone(
    make_datamodule, make_flora, preprocess
):
    """The in-process loop encodes all clients at once, a Flower node one partition at a
    time: the features must be the same bits (batches never span two clients); with
    ``data.preprocess: device`` too (uint8 batches preprocessed by the model)."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = make_datamodule(local_test_fraction=0.25, eval_batch_size=64, preprocess=preprocess)
    data.setup()
    model = make_flora()
    model.configure_task(data.class_names, data.template)
    data.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    together = FeatureCache(fabric, model, data)
    together.build([0, 1, 2], test=False)
    assert set(together.features) == {"0", "1", "2", "local_test/0", "local_test/1",
                                      "local_test/2"}  # fmt: skip
    for client in (0, 1, 2):
        alone = FeatureCache(fabric, model, data)
        alone.build([client], test=False)
        for key in (str(client), f"local_test/{client}"):
            assert torch.equal(together.features[key][0], alone.features[key][0])
            assert torch.equal(together.features[key][1], alone.features[key][1])
    # ... and the features of the client's own loader, batch by batch (no cache involved)
    loader = DataLoader(data.client_dataset(1), batch_size=64, collate_fn=data.collate)
    model.eval()
    with torch.no_grad(), fabric.autocast():
        expected = torch.cat([model.frozen_image_features(x).float() for x, _ in loader])
    assert len(expected) == data.num_samples(1) > 64  # more than one batch
    assert torch.equal(together.features["1"][0], expected)


def test_device_preprocess_has_its_own_disk_cache(make_datamodule, make_flora, tmp_path):
    """Features from device preprocessing differ from the processor's by rounding (<= 2 uint8
    levels per pixel): a disk cache must not hand one's features to the other."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = make_flora()
    caches = {}
    for preprocess in ("processor", "device"):
        data = make_datamodule(preprocess=preprocess)
        data.setup()
        model.configure_task(data.class_names, data.template)
        data.set_image_transform(model.image_transform)
        cache = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
        cache.build([0], test=True)
        caches[preprocess] = cache
    processor, device = caches["processor"], caches["device"]
    assert processor.fingerprint(["0", "test"]) != device.fingerprint(["0", "test"])
    assert len(list(tmp_path.glob("*/features.safetensors"))) == 2
    for key in ("0", "test"):
        assert torch.equal(processor.features[key][1], device.features[key][1])  # labels
        # each its own encoding (the processor's differ by the rounding of a few pixels)
        assert not torch.equal(processor.features[key][0], device.features[key][0])


def first_vision_matrix(model) -> torch.Tensor:
    """The first vision weight with more than 64 values."""
    vision = model.clip_model().vision_model
    return next(t for t in vision.state_dict().values() if t.numel() > 64)


def test_fingerprint_hashes_every_vision_weight(make_datamodule, make_flora):
    """Two image encoders equal in the first 64 values of every tensor are different models:
    their features differ, so their disk caches must too."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = make_datamodule()
    data.setup()
    base, changed = make_flora(), make_flora()
    with torch.no_grad():
        first_vision_matrix(changed).view(-1)[100] += 1.0  # beyond the first 64 values
    prints = [FeatureCache(fabric, m, data).fingerprint(["0"]) for m in (base, changed)]
    assert prints[0] != prints[1]


def test_the_weights_are_hashed_once_per_model(make_flora, monkeypatch):
    vision = make_flora().clip_model().vision_model
    digest = feature_cache.vision_weights_digest(vision)
    monkeypatch.setattr(feature_cache.hashlib, "sha256", None)  # hashing again would fail
    assert feature_cache.vision_weights_digest(vision) == digest


@pytest.mark.parametrize("damage", ["flip", "no_manifest"])
def test_a_damaged_disk_cache_is_encoded_again(
    make_datamodule, make_flora, tmp_path, caplog, damage
):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = make_datamodule(max_test_samples=32)
    data.setup()
    model = make_flora()
    model.configure_task(data.class_names, data.template)
    data.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    built = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
    built.build([0], test=True)
    (folder,) = tmp_path.iterdir()
    path = folder / FEATURES_FILE
    if damage == "flip":
        data_bytes = bytearray(path.read_bytes())
        data_bytes[-1] ^= 0xFF  # a flipped bit in the features: still readable safetensors
        path.write_bytes(bytes(data_bytes))
        reason = "checksum mismatch"
    else:
        (folder / "manifest.json").unlink()
        reason = "has no manifest.json"
    reread = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
    reread.build([0], test=True)
    assert f"feature cache {folder} is not usable" in caplog.text and reason in caplog.text
    for key in ("0", "test"):
        assert torch.equal(reread.features[key][0], built.features[key][0])
        assert torch.equal(reread.features[key][1], built.features[key][1])
    caplog.clear()
    again = FeatureCache(fabric, model, data, disk_dir=str(tmp_path))
    again.build([0], test=True)  # the folder was replaced by a whole one: read, no warning
    assert "not usable" not in caplog.text
    assert torch.equal(again.features["0"][0], built.features["0"][0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_loader_yields_the_plain_loaders_batches(shuffle):
    """One gather per batch, the same rows in the same order as TensorDataset + DataLoader
    with the same seeded generator (two epochs: the second shuffle too)."""
    from torch.utils.data import TensorDataset

    x, y = torch.randn(37, 5), torch.arange(37)
    plain_gen = torch.Generator().manual_seed(3) if shuffle else None
    fast_gen = torch.Generator().manual_seed(3) if shuffle else None
    plain = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle, generator=plain_gen)
    fast = feature_cache.batch_loader(x, y, 8, fast_gen)
    for _ in range(2):
        pairs = list(zip(plain, fast, strict=True))
        assert [len(b[1]) for b, _ in pairs] == [8, 8, 8, 8, 5]
        for (px, py), (fx, fy) in pairs:
            assert torch.equal(px, fx) and torch.equal(py, fy)
    if shuffle:  # the order really is shuffled (the check above would pass for any order)
        assert list(torch.cat([b[1] for b in fast])) != list(range(37))
