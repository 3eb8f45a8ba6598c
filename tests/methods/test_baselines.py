"""The paper's baselines on the tiny CLIP: what trains and travels, what changes, that they learn."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flora_lightning.clip.backbone import CLIPBundle, image_features, text_features
from flora_lightning.methods import METHODS, FedAA, FedFFT, FedLC, FedVMLC, OptimizerConfig
from flora_lightning.methods.base import FederatedCLIPModule, build_model_from_bundle
from flora_lightning.offline.digits import CLASS_NAMES

TINY_CLIP = "flora-offline/tiny-clip"
TEMPLATE = "a photo of the digit {}."
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASELINES = [FedFFT, FedLC, FedVMLC, FedAA]
D = 64  # tiny CLIP projection_dim
C = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def make_method(tiny_clip):
    """Factory: a baseline on a private copy of the tiny CLIP, its task set (digits)."""

    def make(cls, lr: float = 1e-3, seed: int = 0, task: bool = True):
        bundle = CLIPBundle(
            copy.deepcopy(tiny_clip.model),
            tiny_clip.tokenizer,
            tiny_clip.image_transform,
            tiny_clip.device_preprocess,
        )
        torch.manual_seed(seed)  # FedAA's adapter init
        module = build_model_from_bundle(cls(TINY_CLIP, optimizer=OptimizerConfig(lr=lr)), bundle)
        if task:
            module.configure_task(CLASS_NAMES, TEMPLATE)
        return module

    return make


def clip_names(clip, prefix: str = "") -> set[str]:
    return {f"clip.{n}" for n, _ in clip.named_parameters() if n.startswith(prefix)}


def expected_trainable(cls, clip) -> set[str]:
    head = {"head.weight", "head.bias"}
    return {
        FedFFT: clip_names(clip),
        FedLC: head,
        FedVMLC: clip_names(clip, "vision_model.") | head,
        FedAA: {f"adapter.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
    }[cls]


def expected_count(cls, clip) -> int:
    vision = sum(p.numel() for p in clip.vision_model.parameters())
    return {
        FedFFT: sum(p.numel() for p in clip.parameters()),
        FedLC: (D + 1) * C,
        FedVMLC: vision + (D + 1) * C,
        FedAA: 2 * (D * D + D),
    }[cls]


def test_registry_names_every_method():
    assert {name: cls.__name__ for name, cls in METHODS.items()} == {
        "flora": "FLoRA",
        "fedfft": "FedFFT",
        "fedlc": "FedLC",
        "fedvmlc": "FedVMLC",
        "fedaa": "FedAA",
    }
    assert [cls.method_name for cls in BASELINES] == ["FedFFT", "FedLC", "FedVMLC", "FedAA"]


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.__name__)
def test_trainable_set_is_exactly_the_method_parameters(make_method, tiny_clip, cls):
    model = make_method(cls)
    names = {n for n, _ in model.trainable_named_parameters()}
    assert names == expected_trainable(cls, tiny_clip.model)
    assert model.num_trainable_parameters() == expected_count(cls, tiny_clip.model)
    state = model.communicated_state()
    assert set(state) == names
    assert sum(t.numel() for t in state.values()) == expected_count(cls, tiny_clip.model)
    # The tiny CLIP's counts, spelled out: 650 = 65 x 10; 8,320 = 2 x (64 x 64 + 64).
    assert {FedLC: 650, FedAA: 8_320}.get(cls, model.num_trainable_parameters()) == (
        model.num_trainable_parameters()
    )
    if cls is FedVMLC:
        assert not any("visual_projection" in n or "text_model" in n for n in names)
    assert model.image_encoder_frozen == (cls in (FedLC, FedAA))


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.__name__)
def test_one_round_changes_exactly_the_trainable_parameters(
    make_method, make_datamodule, make_loop, cls
):
    model = make_method(cls, task=False)  # the loop sets the task, as in a real run
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop = make_loop(rounds=1, max_local_steps=2, cache_features=False)
    loop.fit(model, make_datamodule(num_clients=2, max_test_samples=32))
    after = dict(model.named_parameters())
    trainable = expected_trainable(cls, model.clip)
    # FedLC/FedVMLC's head exists only once the task is known.
    assert set(after) == set(before) | trainable
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    frozen_changed = changed - trainable
    assert not frozen_changed, sorted(frozen_changed)[:5]
    # Every trained tensor moved (coupled weight decay moves even zero-gradient entries),
    # except FedFFT's logit_scale: communicated, never trained, as the released FFT client.
    new_heads = trainable - set(before)
    fixed = {"clip.logit_scale"} if cls is FedFFT else set()
    assert changed | new_heads == trainable - fixed
    assert [p for n, p in after.items() if p.requires_grad and n not in trainable] == []


def test_fedfft_logit_scale_travels_but_never_trains(make_method):
    size = None
    for train_logit_scale in (False, True):
        model = make_method(FedFFT)
        model.train_logit_scale = train_logit_scale
        assert "clip.logit_scale" in model.communicated_state()
        optimizer = model.configure_optimizers()
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Not optimized: no Adam step, so no weight decay either.
        assert (id(model.clip.logit_scale) in optimized) is train_logit_scale
        assert len(optimized) == len(model.trainable_parameters()) - (not train_logit_scale)
        size = model.clip.config.vision_config.image_size
        pixels, labels = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
        model.train()
        model.training_step((pixels, labels)).backward()
        # Read detached by default, as the released FFT client.
        assert (model.clip.logit_scale.grad is not None) is train_logit_scale
        assert model.clip.text_projection.weight.grad is not None


def test_fedaa_adapter_starts_as_identity_linears(make_method):
    model = make_method(FedAA)
    for linear in (model.adapter[0], model.adapter[2]):
        torch.testing.assert_close(linear.weight, torch.eye(D), rtol=0, atol=0)
        assert torch.count_nonzero(linear.bias) == 0
    # a(x) = softmax(tanh(f)) at the start
    f = torch.randn(5, D)
    torch.testing.assert_close(model.adapter(f), torch.softmax(torch.tanh(f), dim=-1))
    torch.manual_seed(0)
    default = FedAA(TINY_CLIP, adapter_init="torch")
    default.clip = model.clip
    default.setup_trainable()
    assert not torch.equal(default.adapter[0].weight, torch.eye(D))
    with pytest.raises(ValueError, match="model.adapter_init must be identity or torch"):
        FedAA(TINY_CLIP, adapter_init="eye")


def test_fedlc_logits_are_unscaled_by_default(make_method):
    model = make_method(FedLC)
    assert model.scale_logits is False
    feats = F.normalize(torch.randn(6, D), dim=-1)
    expected = feats @ model.head.weight.T + model.head.bias  # fc(x / |x|), released
    torch.testing.assert_close(model.head_logits(feats), expected)
    model.scale_logits = True
    scale = model.clip.logit_scale.exp()
    torch.testing.assert_close(model.head_logits(feats), scale * expected)


def test_fedaa_cached_features_give_the_uncached_update(make_method, make_datamodule, make_loop):
    """FedAA caches the raw projection: its adapter is not scale invariant."""
    states, accs = [], []
    for cache in (False, True):
        model = make_method(FedAA, task=False)
        loop = make_loop(rounds=1, max_local_steps=2, cache_features=cache, run=f"cache{cache}")
        summary = loop.fit(model, make_datamodule(num_clients=2, max_test_samples=64))
        states.append(model.communicated_state())
        accs.append([r["test_acc"] for r in summary["rounds"]])
    assert accs[0] == pytest.approx(accs[1], abs=1e-9)
    # Bitwise equal here (AVX512, AVX2 and default kernels). Cached features are encoded at the
    # eval batch size, uncached at the training one, so another BLAS may round a row differently
    # and Adam (eps 1e-6) amplifies it; float64 needs FeatureCache to keep float64 rows.
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, atol=1e-5, rtol=1e-4)


def zero_shot(clip, tokenizer, transform, datamodule) -> tuple[float, torch.Tensor]:
    """Zero-shot top-1 on the test set, straight from the CLIPModel; also the logits."""
    tokens = tokenizer([TEMPLATE.format(n) for n in CLASS_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(
            text_features(clip, tokens["input_ids"], tokens["attention_mask"]), dim=-1
        )
        test = datamodule.test_set
        pixels = torch.stack([transform(image) for image in test["image"]])
        img = F.normalize(image_features(clip, pixels), dim=-1)
        logits = clip.logit_scale.exp() * img @ txt.T
    labels = torch.tensor(test["label"])
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def test_fedlc_round_zero_is_zero_shot(make_method, make_datamodule, make_loop, tiny_clip):
    data = make_datamodule(num_clients=2)
    model = make_method(FedLC, task=False)
    summary = make_loop(rounds=0, cache_features=False).fit(model, data)
    acc, logits = zero_shot(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.image_transform, data)
    assert 0.3 < acc < 0.9  # neither trivial nor solved: the comparison means something
    assert summary["rounds"][0]["test_acc"] == pytest.approx(acc, abs=1e-9)
    # Not only the argmax: the head's logits are the zero-shot logits without CLIP's logit
    # scale (the released fc(x / |x|)), and with it when scale_logits is set.
    scale = tiny_clip.model.logit_scale.exp()
    with torch.no_grad():
        pixels = torch.stack([tiny_clip.image_transform(i) for i in data.test_set["image"][:16]])
        head = model.evaluate_batch(pixels, model.class_embeddings())
        model.scale_logits = True
        scaled = model.evaluate_batch(pixels, model.class_embeddings())
    # Forward only (no optimizer to amplify): the two batchings (16 images vs the whole test
    # set) round the vision tower differently by a few float32 ulps of the |cos| <= 1 logits
    # (measured 2 u, u = 6e-8, on AVX512, AVX2 and default kernels); 1e-5 is ~170 u of the
    # logit scale, while a missing normalisation or scale changes them by orders more.
    torch.testing.assert_close(head, logits[:16] / scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled, logits[:16], atol=1e-5 * scale.item(), rtol=0)


def test_fedlc_keeps_a_trained_head_for_the_same_task(make_method):
    model = make_method(FedLC)
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    model.configure_task(CLASS_NAMES, TEMPLATE)
    assert torch.equal(model.head.bias, torch.ones(C))
    model.configure_task(CLASS_NAMES[:3], TEMPLATE)
    assert model.head.weight.shape == (3, D) and torch.equal(model.head.bias, torch.zeros(3))


def test_fedaa_text_features_are_computed_once(make_method, monkeypatch):
    model = make_method(FedAA)
    expected = FederatedCLIPModule.class_text_features(model)  # through the text tower
    monkeypatch.setattr("flora_lightning.methods.base.text_features", None)  # must not be used
    labels = torch.tensor([3, 1, 3])
    torch.testing.assert_close(model.class_text_features(), expected)
    torch.testing.assert_close(model.class_text_features(labels), expected[labels])
    pixels = torch.randn(4, 3, 32, 32)
    loss = model(pixels, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.adapter.parameters())


def test_head_methods_need_the_task_first(make_method):
    model = make_method(FedLC, task=False)
    with pytest.raises(RuntimeError, match=r"configure_task"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"configure_task"):
        make_method(FedAA, task=False).class_text_features()


# Settings measured on the offline digits (3 clients, 8 local steps of 32 images per round).
# FedFFT first dips below zero-shot (0.61 -> 0.49 after round 1, also with one client or no
# weight decay: the whole text tower moves at once) and passes it from round 3 on (0.75).
LEARNING = {
    FedFFT: dict(lr=1e-4, rounds=4),  # 0.61 -> 0.49, 0.59, 0.75
    FedLC: dict(lr=1e-3, rounds=2),  # 0.61 -> 0.75, 0.88
    FedVMLC: dict(lr=3e-4, rounds=1),  # 0.61 -> 0.77
    FedAA: dict(lr=1e-2, rounds=3),  # 0.61 -> 0.64, 0.71, 0.72
}


@pytest.mark.parametrize(
    "cls",
    [pytest.param(FedFFT, marks=pytest.mark.slow), FedLC, FedVMLC, FedAA],
    ids=lambda c: c.__name__,
)
def test_each_baseline_learns(make_method, make_datamodule, make_loop, cls):
    setting = LEARNING[cls]
    model = make_method(cls, lr=setting["lr"], task=False)
    loop = make_loop(rounds=setting["rounds"], max_local_steps=8)
    summary = loop.fit(model, make_datamodule(num_clients=3, max_test_samples=128))
    accs = [r["test_acc"] for r in summary["rounds"]]
    assert accs[-1] > max(accs[0] + 0.05, 0.1 + 0.3), accs


@pytest.mark.parametrize("short", ["fedfft", "fedlc", "fedvmlc", "fedaa"])
def test_configs_select_the_method(short):
    from flora_lightning.cli import build_parser

    parser = build_parser()
    cls = METHODS[short]
    for config, name_or_path in (
        (CONFIGS / f"quickstart_{short}.yaml", TINY_CLIP),
        (CONFIGS / f"cifar10_noniid_{short}.yaml", "openai/clip-vit-base-patch32"),
    ):
        parsed = parser.parse_args(["fit", "--config", str(config)])
        model = parser.instantiate_classes(parsed).fit.model
        assert type(model) is cls and model.name_or_path == name_or_path
    # `--model <Class>` on FLoRA's config keeps name_or_path and optimizer, drops lora.
    parsed = parser.parse_args(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--model", cls.__name__]
    )
    model = parser.instantiate_classes(parsed).fit.model
    assert type(model) is cls and model.optimizer_config.lr == 1e-3


def adam_path_tolerance(config: OptimizerConfig, steps: int, largest_weight: float) -> float:
    """Bound on |fused - plain| after ``steps`` float64 Adam steps fed identical gradients.

    Each path rounds its step differently (op order): a few ulps of the weight, r <= 8 u |p|
    (u = 2**-53; rounding inside the update, of g, m and v, moves it by O(10 u lr), far smaller:
    Adam's update is scale invariant in g up to eps). A weight difference d
    re-enters every later step only through the coupled decay, g = grad + wd * p, and Adam's
    update moves by at most K * lr / eps per unit of any past g (K = 2.6 bounds the m and v
    paths for betas (0.9, 0.98) and t <= 3 by Cauchy-Schwarz; at t = 1 the exact slope of
    lr * g / (|g| + eps) is lr / eps), so d grows by a = K * lr * wd / eps per step (520 here):
    d_1 <= r, d_2 <= (2 + a) r, d_3 <= (3 + 4a + a^2) r, i.e. ~1e-9 at |p| <= 4.6, where a real
    difference in Adam's math moves weights by ~lr = 1e-3.
    """
    assert steps == 3 and tuple(config.betas) == (0.9, 0.98)  # where K and d_3 were derived
    r = 8 * torch.finfo(torch.float64).eps / 2 * largest_weight
    a = 2.6 * config.lr * config.weight_decay / config.eps
    return (3 + 4 * a + a**2) * r


def test_fused_adam_gives_the_same_update(make_method):
    """``optimizer.fused``: FedFFT (every CLIP weight) after 3 steps, fused vs torch's default.

    float32 cannot tell the two apart soundly: with eps 1e-6 and coupled weight decay 0.2 a
    1-ulp difference grows ~lr * wd / eps = 200x per step (and ~lr * H / eps through the loss
    Hessian when each path computes its own gradient), so one element on another CPU landed
    just over 1e-6. Both paths run in float64 (CPU fused Adam supports it) and get the plain
    model's gradients, so only the optimizers differ and the tolerance is derived above.
    """
    plain, fused = make_method(FedFFT).double(), make_method(FedFFT).double()
    optimizers = []
    for module, is_fused in ((plain, False), (fused, True)):
        module.optimizer_config = OptimizerConfig(lr=1e-3, fused=is_fused)
        optimizers.append(module.configure_optimizers())
        assert bool(optimizers[-1].defaults["fused"]) == is_fused
        module.train()
    torch.manual_seed(0)
    batch = (torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5]))
    fused_params = dict(fused.named_parameters())
    for _ in range(3):
        plain.training_step(batch).backward()
        for name, param in plain.named_parameters():
            if param.grad is not None:
                fused_params[name].grad = param.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    after_plain, after_fused = plain.communicated_state(), fused.communicated_state()
    start = make_method(FedFFT).double().communicated_state()
    assert set(after_plain) == set(after_fused) == set(start)
    assert all(t.dtype == torch.float64 for t in after_fused.values())
    largest = max(t.abs().max().item() for t in after_plain.values())
    tolerance = adam_path_tolerance(fused.optimizer_config, steps=3, largest_weight=largest)
    assert tolerance < 1e-8  # far below a real difference in the update (~lr = 1e-3)
    for name, tensor in after_plain.items():
        error = (after_fused[name] - tensor).abs().max().item()
        assert error <= tolerance, (name, error, tolerance)
    moved = [n for n in start if not torch.equal(after_plain[n], start[n])]
    assert moved  # the steps moved weights
