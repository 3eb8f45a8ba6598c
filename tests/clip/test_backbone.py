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
