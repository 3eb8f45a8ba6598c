"""``flora bench`` step timing: torch.utils.benchmark's blocked_autorange on real local steps."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.bench.timing import time_steps
from flora_lightning.bench.workload import build_clip_bundle
from flora_lightning.methods import FLoRA
from flora_lightning.methods.base import build_model_from_bundle


@pytest.fixture
def setup():
    import lightning as L

    torch.manual_seed(0)
    model = build_model_from_bundle(FLoRA("random-init/tiny"), build_clip_bundle("tiny"))
    model.configure_task(["cat", "dog", "ship"], "a photo of a {}.")
    batch = (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    return L.Fabric(accelerator="cpu", devices=1), model, batch


def test_at_least_steps_are_timed_and_they_train(setup):
    fabric, model, batch = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    threads = torch.get_num_threads()
    timing = time_steps(fabric, model, batch, steps=3, warmup=1, min_seconds=0.0)
    assert timing.timed_steps >= 3
    assert timing.seconds > 0 and timing.cpu_seconds > 0
    blocks = timing.block_seconds
    assert min(blocks) <= timing.seconds <= max(blocks)
    # Real optimizer steps ran (LoRA B starts at zero and moves), and in train mode only then.
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert not model.training
    assert torch.get_num_threads() == threads  # the Timer ran with, and left, our threads


def test_fast_steps_are_timed_for_min_seconds(setup):
    fabric, model, batch = setup
    timing = time_steps(fabric, model, batch, steps=1, warmup=0, min_seconds=0.3)
    # The Timer keeps measuring blocks until 0.3 s were timed, however fast a step is.
    assert timing.timed_seconds >= 0.3 and timing.timed_steps >= 1
    assert timing.timed_seconds >= timing.seconds
    with pytest.raises(ValueError, match="steps must be >= 1"):
        time_steps(fabric, model, batch, steps=0)
