"""CLIP loading: a hub id that cannot be reached fails fast, naming the field and the fixes."""

from __future__ import annotations

import time

import pytest


def test_model_not_available_offline_fails_fast(monkeypatch):
    from flora_lightning.clip.backbone import ModelNotAvailableError, load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_clip("openai/clip-vit-base-patch32")
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert message.startswith("model.name_or_path")
    assert "openai/clip-vit-base-patch32" in message
    assert "--model.name_or_path" in message
    assert "flora-offline/tiny-clip" in message


def _checkpoint_with_pickle_weights(folder):
    """The tiny CLIP's config and processor files, its weights saved with ``torch.save``."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from flora_lightning.offline.tiny_clip import tiny_clip_path

    source = tiny_clip_path()
    folder.mkdir()
    for path in source.iterdir():
        if path.suffix in (".json",) and path.name != "manifest.json":
            shutil.copy(path, folder / path.name)
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_a_checkpoint_with_only_pickle_weights_is_refused(tmp_path):
    """Without the refusal transformers would unpickle pytorch_model.bin (the old code loaded it)."""
    from flora_lightning.clip.backbone import ModelNotAvailableError, load_clip

    folder = _checkpoint_with_pickle_weights(tmp_path / "clip")
    with pytest.raises(ModelNotAvailableError) as err:
        load_clip(str(folder))
    message = str(err.value)
    assert message.startswith(f"model.name_or_path: {folder} holds its weights only as pickle")
    assert "pytorch_model.bin" in message
    assert "safetensors" in message and f"save_pretrained('{folder}')" in message


def test_models_load_with_use_safetensors(monkeypatch):
    """Every model load asks transformers for safetensors (a hub repo's .bin is never used)."""
    from transformers import CLIPModel

    from flora_lightning.clip.backbone import load_clip

    calls = []
    original = CLIPModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(spy))
    bundle = load_clip("flora-offline/tiny-clip")
    assert bundle.model is not None
    assert calls and all(kwargs.get("use_safetensors") is True for kwargs in calls)


def test_the_offline_tiny_clip_is_saved_as_safetensors():
    from flora_lightning.offline.tiny_clip import tiny_clip_path

    names = {p.name for p in tiny_clip_path().iterdir()}
    assert "model.safetensors" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))}


def test_a_hub_model_without_safetensors_names_the_conversion(monkeypatch):
    """transformers refuses a hub repo holding only pytorch_model.bin (use_safetensors=True);
    the error then says how to convert it (simulated: no network here)."""
    from transformers import CLIPModel

    from flora_lightning.clip.backbone import ModelNotAvailableError, load_clip

    def refuse(cls, *args, **kwargs):
        assert kwargs["use_safetensors"] is True
        raise OSError("some/clip does not appear to have a file named model.safetensors.")

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(refuse))
    with pytest.raises(ModelNotAvailableError) as err:
        load_clip("some/clip")
    message = str(err.value)
    assert message.startswith("model.name_or_path: could not load CLIP model 'some/clip'")
    assert (
        "safetensors files only" in message and "hf download some/clip --local-dir DIR" in message
    )
