"""BatchedAdam: K clients' Adam steps on stacked parameters equal torch.optim.Adam per client."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.federation.batched_adam import BatchedAdam
from flora_lightning.methods.settings import OptimizerConfig

CONFIG = OptimizerConfig(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
# Both sides are the same elementwise IEEE operations on the same values except addcdiv,
# whose kernel may fuse its multiply-add: a few ulps of each result.
ULPS = 4 * torch.finfo(torch.float32).eps


def torch_adam(param: torch.Tensor, grads: list[torch.Tensor], state: dict | None):
    """``param`` after torch's Adam steps on ``grads`` from ``state``; its final state."""
    p = torch.nn.Parameter(param.clone())
    opt = torch.optim.Adam(
        [p], lr=CONFIG.lr, betas=CONFIG.betas, eps=CONFIG.eps, weight_decay=CONFIG.weight_decay
    )
    if state:
        saved = opt.state_dict()
        saved["state"] = {0: {k: v.clone() for k, v in state.items()}}
        opt.load_state_dict(saved)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state_dict()["state"].get(0, {})


def test_each_client_steps_with_its_own_count_and_masked_clients_stay():
    torch.manual_seed(0)
    k, shape = 3, (4, 5)
    start = torch.randn(k, *shape)
    # client 0 resumes step 7, client 1 resumes step 1, client 2 is fresh
    kept = [
        {"step": torch.tensor(7.0), "exp_avg": torch.randn(shape) * 0.1,
         "exp_avg_sq": torch.rand(shape) * 0.01},
        {"step": torch.tensor(1.0), "exp_avg": torch.randn(shape) * 0.1,
         "exp_avg_sq": torch.rand(shape) * 0.01},
        None,
    ]  # fmt: skip
    grads = [torch.randn(k, *shape) for _ in range(3)]
    # client 1 stops after one step (a straggler), client 2 after two
    active = [torch.tensor([True, True, True]), torch.tensor([True, False, True]),
              torch.tensor([True, False, False])]  # fmt: skip
    stacked = start.clone()
    adam = BatchedAdam([stacked], CONFIG, [None if s is None else {0: s} for s in kept])
    for g, a in zip(grads, active, strict=True):
        adam.step([g], a)
    for c in range(k):
        steps = [g[c] for g, a in zip(grads, active, strict=True) if a[c]]
        expected, state = torch_adam(start[c], steps, kept[c])
        torch.testing.assert_close(stacked[c], expected, rtol=ULPS, atol=0)
        mine = adam.client_state(c)[0]
        assert (
            float(mine["step"])
            == float(state["step"])
            == (kept[c] or {}).get("step", torch.tensor(0.0)).item() + len(steps)
        )
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[key], state[key], rtol=ULPS, atol=0)


def test_a_client_that_never_stepped_has_no_state():
    adam = BatchedAdam([torch.zeros(2, 3)], CONFIG, [None, None])
    adam.step([torch.ones(2, 3)], torch.tensor([True, False]))
    assert adam.client_state(1) == {}
    assert set(adam.client_state(0)) == {0}


def test_inconsistent_kept_state_is_refused():
    bad = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    with pytest.raises(ValueError, match="entries"):
        BatchedAdam([torch.zeros(1, 3), torch.zeros(1, 3)], CONFIG, [bad])
