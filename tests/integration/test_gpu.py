"""CUDA checks: mixed precision and feature caching on a GPU (run with ``pytest -m gpu``)."""

import json

import pytest
import torch

from flora_lightning.cli import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_quickstart_learns_on_cuda(tmp_path, precision):
    args = [
        "fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator", "cuda",
        "--trainer.precision", precision, "--trainer.rounds", "5",
        "--trainer.progress", "false", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    summary = run(args)
    rounds = summary["rounds"]
    assert rounds[-1]["test_acc"] > rounds[0]["test_acc"] + 0.1
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_test_acc"] == pytest.approx(summary["final_test_acc"])


def test_cached_equals_uncached_on_cuda(tmp_path):
    results = []
    for cache in ("true", "false"):
        out = tmp_path / cache
        args = [
            "fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator", "cuda",
            "--trainer.rounds", "2", "--trainer.cache_features", cache,
            "--trainer.progress", "false", "--trainer.default_root_dir", str(out),
        ]  # fmt: skip
        results.append(run(args))
    for cached, plain in zip(results[0]["rounds"], results[1]["rounds"], strict=True):
        assert cached["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-4)
