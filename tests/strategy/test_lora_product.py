"""LoraProductAverage: the mean of the clients' B·A, re-factorised by SVD to rank r."""

from __future__ import annotations

import math

import pytest
import torch

from flora_lightning.strategy import ClientUpdate, FedAvg, LoraProductAverage

R, OUT, IN = 2, 12, 10
A, B = "layers.0.out_proj.lora_A.default.weight", "layers.0.out_proj.lora_B.default.weight"
WEIGHTS = [10, 3, 250, 37]


def state(seed: int, shared_a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = shared_a if shared_a is not None else torch.randn(R, IN, generator=gen) / math.sqrt(R)
    return {
        A: a.clone(),
        B: torch.randn(OUT, R, generator=gen),
        "head": torch.randn(3, generator=gen),
    }


def run(strategy, global_state, states):
    strategy.begin(global_state)
    for k, (s, n) in enumerate(zip(states, WEIGHTS, strict=True)):
        strategy.add(ClientUpdate(client_id=k, state=s, num_samples=n, train_loss=0.0))
    return strategy.result()


def best_rank_r(matrix: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :R] * s[:R] @ vh[:R]


def mean_product(states) -> torch.Tensor:
    total = sum(n * (s[B].double() @ s[A].double()) for s, n in zip(states, WEIGHTS, strict=True))
    return total / sum(WEIGHTS)


def test_result_is_the_best_rank_r_approximation_of_the_mean_product():
    glob, states = state(0), [state(k + 1) for k in range(4)]
    result = run(LoraProductAverage(), glob, states)
    exact = mean_product(states)
    best = best_rank_r(exact)
    product = result[B].double() @ result[A].double()
    torch.testing.assert_close(product, best, rtol=0, atol=1e-5)
    # Never further from the true mean than FedAvg's mean(B) mean(A) (which has rank <= r too).
    fedavg = run(FedAvg(), glob, states)
    naive = fedavg[B].double() @ fedavg[A].double()
    assert (product - exact).norm() < (naive - exact).norm()
    # A keeps the global A's scale (RMS row norm) and has orthogonal rows; B carries the update.
    scale = glob[A].norm() / math.sqrt(R)
    torch.testing.assert_close(result[A].norm(dim=1), torch.full((R,), float(scale)))
    torch.testing.assert_close(result[A] @ result[A].T, scale**2 * torch.eye(R), atol=1e-5, rtol=0)
    # Other tensors are averaged exactly as FedAvg does.
    torch.testing.assert_close(result["head"], fedavg["head"], rtol=0, atol=0)
    assert {k: v.dtype for k, v in result.items()} == {k: v.dtype for k, v in glob.items()}


def test_exact_when_clients_share_a():
    shared = torch.randn(R, IN)
    glob, states = state(0, shared), [state(k + 1, shared) for k in range(4)]
    result = run(LoraProductAverage(), glob, states)
    product = result[B].double() @ result[A].double()
    torch.testing.assert_close(product, mean_product(states), rtol=0, atol=1e-5)


def test_rejected_updates_do_not_enter_the_product():
    glob, states = state(0), [state(k + 1) for k in range(4)]
    bad = {name: t.clone() for name, t in states[1].items()}
    bad[B][0, 0] = float("nan")
    strategy = LoraProductAverage()
    strategy.begin(glob)
    for k, s in enumerate([states[0], bad, states[2]]):
        strategy.add(ClientUpdate(client_id=k, state=s, num_samples=WEIGHTS[k], train_loss=0.0))
    assert strategy.accepted == [0, 2] and "NaN" in strategy.rejected[1]
    result = strategy.result()
    total = WEIGHTS[0] + WEIGHTS[2]
    exact = (
        WEIGHTS[0] * states[0][B].double() @ states[0][A].double()
        + WEIGHTS[2] * states[2][B].double() @ states[2][A].double()
    ) / total
    product = result[B].double() @ result[A].double()
    torch.testing.assert_close(product, best_rank_r(exact), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "names, message",
    [
        ([B, "head"], "has no lora_A partner"),
        ([A, "head"], "has no layers.0.out_proj.lora_B"),
    ],
)
def test_unpaired_factors_are_explained(names, message):
    glob = {name: t for name, t in state(0).items() if name in names}
    with pytest.raises(ValueError, match=message):
        LoraProductAverage().begin(glob)


def test_selectable_from_the_command_line(tmp_path, offline_assets):
    from flora_lightning import cli

    summary = cli.run(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.strategy",
            "LoraProductAverage",
            "--trainer.rounds",
            "3",  # with the released init (std 1/sqrt(r)) it learns from round 3 on
            "--trainer.progress",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    assert (tmp_path / "run" / "config.yaml").read_text().count("LoraProductAverage") == 1
    assert summary["rounds"][-1]["test_acc"] > summary["rounds"][0]["test_acc"]


EPS32 = torch.finfo(torch.float32).eps


def raw_factors(glob, states):
    """The unaligned SVD factors (``factor_alignment="none"``: the factors before alignment)."""
    return run(LoraProductAverage(factor_alignment="none"), glob, states)


def previous(glob, b, a):
    """``glob`` with its LoRA pair replaced by ``(b, a)`` (what the clients trained from)."""
    return {**glob, A: a.contiguous(), B: b.contiguous()}


def float32_tolerance(b: torch.Tensor, a: torch.Tensor) -> float:
    """How far two float32 roundings of the same float64 factors (scale ``c`` recomputed from a
    float32 ``A``: relative error <= r * eps) can be apart: a few eps of the largest entry."""
    return 8 * EPS32 * float(max(b.abs().max(), a.abs().max()))


def test_default_alignment_undoes_a_sign_flip_of_the_svd():
    glob, states = state(0), [state(k + 1) for k in range(4)]
    raw = raw_factors(glob, states)
    flip = torch.tensor([-1.0, 1.0])
    # The clients trained from factors whose first component has the other sign: same product.
    prev = previous(glob, raw[B] * flip, flip[:, None] * raw[A])
    assert torch.equal(prev[B] @ prev[A], raw[B] @ raw[A])
    result = run(LoraProductAverage(), prev, states)  # the default aligns
    tol = float32_tolerance(prev[B], prev[A])
    torch.testing.assert_close(result[B], prev[B], rtol=0, atol=tol)
    torch.testing.assert_close(result[A], prev[A], rtol=0, atol=tol)
    # The raw SVD (what the old code sent) is a sign flip away from them.
    assert (raw[A] - prev[A]).norm() > 1.0
    assert (raw[A] - prev[A]).norm() > 1e4 * (result[A] - prev[A]).norm()


def test_procrustes_undoes_a_rotation_and_keeps_the_product():
    glob, states = state(0), [state(k + 1) for k in range(4)]
    raw = raw_factors(glob, states)
    cos, sin = math.cos(0.7), math.sin(0.7)
    rot = torch.tensor([[cos, -sin], [sin, cos]])
    prev = previous(glob, raw[B] @ rot, rot.T @ raw[A])
    result = run(LoraProductAverage(factor_alignment="procrustes"), prev, states)
    tol = float32_tolerance(prev[B], prev[A])
    torch.testing.assert_close(result[B], prev[B], rtol=0, atol=2 * tol)
    torch.testing.assert_close(result[A], prev[A], rtol=0, atol=2 * tol)
    signs = run(LoraProductAverage(factor_alignment="sign"), prev, states)
    assert (signs[A] - prev[A]).norm() > 0.1  # flips cannot undo a rotation
    # Same product as the raw factors: each float32 entry is within eps of its float64 value,
    # so an entry of B A moves by at most ~2 eps * sum_i |b_i||a_i| (both products).
    for aligned in (result, signs):
        bound = (
            4
            * EPS32
            * (
                aligned[B].abs().double() @ aligned[A].abs().double()
                + raw[B].abs().double() @ raw[A].abs().double()
            )
        )
        diff = aligned[B].double() @ aligned[A].double() - raw[B].double() @ raw[A].double()
        assert (diff.abs() <= bound).all()


def test_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match=r"trainer\.strategy\.factor_alignment"):
        LoraProductAverage(factor_alignment="flip")
