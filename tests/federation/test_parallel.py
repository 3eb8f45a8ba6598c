"""ParallelFit: K clients trained in one batched computation equal ``LocalTrainer.fit`` run one
client after another: adapters, losses, Adam states, over rounds."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from flora_lightning.clip.backbone import CLIPBundle
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.parallel import ParallelFit, parallel_refusal
from flora_lightning.federation.ranks import RankMask, padded_state
from flora_lightning.methods import FedAA, FedFFT, FedLC, FLoRA, LoraSettings, OptimizerConfig
from flora_lightning.methods.base import build_model_from_bundle

TINY_CLIP = "flora-offline/tiny-clip"
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# Tolerances. Both paths do the same arithmetic on the same numbers; they differ only in how
# the kernels group it (a matmul over K*B rows instead of B, a log-sum-exp over padded rows
# whose exp is exactly 0, the caption union instead of one batch's captions), so each result
# carries a few roundings of its own inputs' size: ~eps * |value|. Adam divides a gradient by
# its own running RMS, so a relative gradient error stays a relative error of the update
# (<= lr per step), and over ~30 steps of 3 rounds the adapters (|w| < 1) drift apart by about
# 30 * lr * (few eps), far below the 1e-5. The loss is a log-sum-exp of logits up to the
# logit scale s = 100: its rounding is ~eps32 * s = 1.2e-5 per operation in the worst case,
# hence 4e-5 on the loss (a few roundings); the 1e-5 is for the adapters.
ADAPTER_TOL_32 = 1e-5
LOSS_TOL_32 = 4 * EPS32 * 100
# float64: the same computation with a unit roundoff 2**-29 times smaller, so the same bounds
# scaled by eps64 / eps32.
ADAPTER_TOL_64 = ADAPTER_TOL_32 * EPS64 / EPS32
LOSS_TOL_64 = LOSS_TOL_32 * EPS64 / EPS32


def make_method(tiny_clip, cls, lr, seed=0, **kwargs):
    """A method on a private copy of the tiny CLIP (seeded init)."""
    bundle = CLIPBundle(
        copy.deepcopy(tiny_clip.model),
        tiny_clip.tokenizer,
        tiny_clip.image_transform,
        tiny_clip.device_preprocess,
    )
    torch.manual_seed(seed)
    return build_model_from_bundle(
        cls(TINY_CLIP, optimizer=OptimizerConfig(lr=lr), **kwargs), bundle
    )


class Pair:
    """The same method twice (same init), a LocalTrainer each (own optimizer-state store),
    one feature cache: one copy trains sequentially, the other batched."""

    def __init__(self, tiny_clip, data, cls, lr, precision="32-true", **trainer_kwargs):
        self.data = data
        self.fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
        self.models, self.trainers = [], []
        method = trainer_kwargs.pop("method", {})
        for _ in range(2):
            model = make_method(tiny_clip, cls, lr, **method)
            self.fabric.setup_module(model)  # 64-true: the model in float64
            model.configure_task(data.class_names, data.template)
            self.models.append(model)
            self.trainers.append(LocalTrainer(self.fabric, seed=42, **trainer_kwargs))
        self.cache = FeatureCache(self.fabric, self.models[0], data)
        self.cache.build(list(range(data.num_clients)), test=False)
        dtype = next(iter(self.models[0].communicated_state().values())).dtype
        # the cache keeps fp32 features; a float64 run trains from them in float64
        self.cache.features = {k: (x.to(dtype), y) for k, (x, y) in self.cache.features.items()}

    def sequential(self, start, clients, round_, max_steps, mu=0.0, ranks=None):
        """One after another; a lower-rank client as RoundEngine.prepare_client sets it up."""
        model, trainer = self.models[0], self.trainers[0]
        updates = []
        for i, (client, steps) in enumerate(zip(clients, max_steps, strict=True)):
            rank = None if ranks is None else ranks[i]
            params = dict(model.trainable_named_parameters())
            model.load_communicated_state(start if rank is None else
                                          padded_state(start, rank, params))  # fmt: skip
            mask = None if rank is None else RankMask(params, rank)
            updates.append(trainer.fit(model, self.data, client, round_, self.cache, mu, steps))
            if mask is not None:
                mask.remove()
        return updates

    def parallel(self, start, clients, round_, max_steps, mu=0.0, ranks=None):
        model = self.models[1]
        model.load_communicated_state(start)
        fit = ParallelFit(self.trainers[1])
        return fit.fit(model, self.data, clients, round_, self.cache, mu, max_steps, ranks)

    def rounds(self, schedule, adapter_tol, loss_tol, mu=0.0, ranks=None):
        """Run ``schedule`` (per round: clients and straggler caps) both ways from the same
        global state each round (the mean of the sequential updates); assert each client's
        update and kept Adam state agree."""
        start = self.models[0].communicated_state()
        for round_, (clients, caps) in enumerate(schedule, start=1):
            round_ranks = None if ranks is None else [ranks[c] for c in clients]
            seq = self.sequential(start, clients, round_, caps, mu, round_ranks)
            par = self.parallel(start, clients, round_, caps, mu, round_ranks)
            for a, b in zip(seq, par, strict=True):
                assert (a.client_id, a.num_samples) == (b.client_id, b.num_samples)
                assert set(a.state) == set(b.state)
                moved = max((a.state[n] - start[n]).abs().max() for n in a.state)
                assert moved > 100 * adapter_tol  # the fit changed the adapter: a real check
                for name in a.state:
                    assert b.state[name].dtype == a.state[name].dtype
                    torch.testing.assert_close(
                        b.state[name], a.state[name], rtol=0, atol=adapter_tol
                    )
                assert abs(a.train_loss - b.train_loss) <= loss_tol
                kept = [t.optimizer_states for t in self.trainers]
                assert (a.client_id in kept[0]) == (b.client_id in kept[1])
                if a.client_id in kept[0]:
                    assert_same_adam_state(kept[0][a.client_id], kept[1][b.client_id])
            start = {n: sum(u.state[n] for u in seq) / len(seq) for n in start}
        assert set(self.trainers[0].optimizer_states) == set(self.trainers[1].optimizer_states)


def assert_same_adam_state(seq: dict, par: dict) -> None:
    """Same parameter indices, the same step counts (exactly), moments close (relative to
    their size: the second moment is a sum of squared gradients, ~eps relative rounding)."""
    assert set(seq) == set(par)
    for i, slots in seq.items():
        assert par[i]["step"].dtype == slots["step"].dtype
        assert float(par[i]["step"]) == float(slots["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(slots[key].abs().max())
            torch.testing.assert_close(par[i][key], slots[key], rtol=0, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def data(make_datamodule):
    """4 Dirichlet clients of 229, 242, 334 and 274 samples: with batch 64 their last batches
    hold 37, 50, 14 and 18 rows, so every epoch ends on a partial, differently sized batch."""
    data = make_datamodule(num_clients=4, batch_size=64)
    data.setup("fit")
    return data


# Round 1: clients 0-2, client 1 a straggler (3 steps of its 8). Round 2: all four (client 3
# starts a fresh Adam, the others resume theirs at different step counts; client 2 capped).
SCHEDULE = [([0, 1, 2], [None, 3, None]), ([0, 1, 2, 3], [None, None, 2, None])]


def test_flora_cached_batched_equals_sequential_over_rounds(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, local_epochs=2)
    assert [data.num_samples(c) % 64 for c in range(4)] == [37, 50, 14, 18]
    pair.rounds(SCHEDULE + [([1, 3], [None, None])], ADAPTER_TOL_32, LOSS_TOL_32)


def test_flora_freeze_a_batched_equals_sequential(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, method={"lora": LoraSettings(freeze_a=True)})
    assert all("lora_B" in n for n in pair.models[0].communicated_state())
    pair.rounds(SCHEDULE, ADAPTER_TOL_32, LOSS_TOL_32)


def test_mixed_lora_ranks_batched_equal_sequential(tiny_clip, data):
    """Model rank 4; clients 1 and 2 train at ranks 2 and 1 (zero-padded, masked slots: both
    factors of a padded slot are zero, so its gradient is zero even without the mask, which
    mirrors RankMask; starting from the padded slice is what this checks)."""
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, method={"lora": LoraSettings(rank=4)})
    ranks = {0: None, 1: 2, 2: 1, 3: None}
    pair.rounds(SCHEDULE, ADAPTER_TOL_32, LOSS_TOL_32, ranks=ranks)
    kept = pair.trainers[1].optimizer_states[2]  # rank 1: its slots beyond stay untouched
    names = list(pair.models[1].communicated_state())
    for i, name in enumerate(names):
        moments = kept[i]["exp_avg_sq"]
        beyond = moments[1:] if "lora_A" in name else moments[:, 1:]
        assert torch.count_nonzero(beyond) == 0


def test_fedprox_batched_equals_sequential(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, max_local_steps=4)
    pair.rounds(SCHEDULE[:1], ADAPTER_TOL_32, LOSS_TOL_32, mu=5.0)


@pytest.mark.parametrize("cls, lr", [(FedLC, 1e-3), (FedAA, 1e-3)])
def test_heads_batched_equal_sequential(tiny_clip, data, cls, lr):
    pair = Pair(tiny_clip, data, cls, lr=lr)
    pair.rounds(SCHEDULE, ADAPTER_TOL_32, LOSS_TOL_32)


def test_float64_batched_equals_sequential_to_a_tighter_bound(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, precision="64-true")
    assert next(iter(pair.models[1].communicated_state().values())).dtype == torch.float64
    pair.rounds(SCHEDULE, ADAPTER_TOL_64, LOSS_TOL_64)


def test_kept_optimizer_state_off_keeps_nothing(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, keep_optimizer_state=False, max_local_steps=2)
    pair.rounds(SCHEDULE[:1], ADAPTER_TOL_32, LOSS_TOL_32)
    assert len(pair.trainers[1].optimizer_states) == 0


def test_model_keeps_its_state_and_attention_and_repeated_clients_are_refused(tiny_clip, data):
    pair = Pair(tiny_clip, data, FLoRA, lr=1e-3, max_local_steps=1)
    model = pair.models[1]
    before = model.communicated_state()
    text_config = model.clip_model().text_model.config
    attention = text_config._attn_implementation
    assert attention != "eager"  # the batched fit switches it for its steps only
    ParallelFit(pair.trainers[1]).fit(model, data, [0, 1], 1, pair.cache)
    for name, tensor in model.communicated_state().items():
        assert torch.equal(tensor, before[name])
    assert text_config._attn_implementation == attention
    with pytest.raises(ValueError, match="clients repeat"):
        ParallelFit(pair.trainers[1]).fit(model, data, [0, 0], 1, pair.cache)


class _DPStep:
    """Stands for sample-level DP-SGD's step: a replaced local step."""


@pytest.mark.parametrize(
    "case, message",
    [
        ("dp", "sample-level DP-SGD"),
        ("fedfft", "FedFFT trains"),
        ("uncached", "trainer.cache_features"),
        ("dropout", "model.lora.dropout=0.1"),
        ("precision", "trainer.precision=bf16-mixed"),
    ],
)
def test_refusals_name_the_field(tiny_clip, data, case, message):
    precision = "bf16-mixed" if case == "precision" else "32-true"
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    trainer = LocalTrainer(fabric, step_fn=_DPStep() if case == "dp" else None)
    if case == "fedfft":
        model = make_method(tiny_clip, FedFFT, 1e-3)
    else:
        lora = LoraSettings(dropout=0.1 if case == "dropout" else 0.0)
        model = make_method(tiny_clip, FLoRA, 1e-3, lora=lora)
    model.configure_task(data.class_names, data.template)
    source = data if case == "uncached" else FeatureCache(fabric, model, data)
    assert message in parallel_refusal(trainer, model, source)
    with pytest.raises(ValueError, match="trainer.parallel_clients"):
        ParallelFit(trainer).fit(model, data, [0, 1], 1, source)


def test_paper_flora_is_not_refused(tiny_clip, data):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = make_method(tiny_clip, FLoRA, 1e-3)
    assert parallel_refusal(LocalTrainer(fabric), model, FeatureCache(fabric, model, data)) is None
