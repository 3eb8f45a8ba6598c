"""DP-SGD: exact per-example gradients, the clip bound, the noise std, a seeded private fit."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.privacy import DPSGDStep, local_steps
from flora_lightning.privacy.dpsgd import (
    class_logits,
    clip_factors,
    optimized_named_parameters,
    per_example_gradients,
    per_example_norms,
    private_gradient,
)

CLASSES = [str(i) for i in range(10)]
TEMPLATE = "a photo of the digit {}."


def flora_with_nonzero_b(make_flora):
    model = make_flora()
    model.configure_task(CLASSES, TEMPLATE)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 at init would make every text-side gradient of A zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def baseline(tiny_clip, method: str):
    from flora_lightning.clip.backbone import CLIPBundle
    from flora_lightning.methods.base import build_model_from_bundle
    from flora_lightning.methods.fedaa import FedAA
    from flora_lightning.methods.fedlc import FedLC

    bundle = CLIPBundle(
        copy.deepcopy(tiny_clip.model), tiny_clip.tokenizer, tiny_clip.image_transform
    )
    name = "flora-offline/tiny-clip"
    # FedAA's random adapter init (not the identity): a generic point to differentiate at.
    module = FedAA(name, adapter_init="torch") if method == "fedaa" else FedLC(name)
    torch.manual_seed(0)
    model = build_model_from_bundle(module, bundle)
    model.configure_task(CLASSES, TEMPLATE)
    return model


def features_and_labels(model, n=6, seed=0, pixels=False):
    gen = torch.Generator().manual_seed(seed)
    config = model.clip_model().config
    if pixels:
        size = config.vision_config.image_size
        inputs = torch.randn(n, 3, size, size, generator=gen)
    else:
        inputs = F.normalize(torch.randn(n, config.projection_dim, generator=gen), dim=-1)
    return inputs, torch.randint(0, len(CLASSES), (n,), generator=gen)


# vmap'd per-example gradients and a backward per example are the same math in other kernels
# (batched vs unbatched), so they differ by rounding: measured ~800 u relative to the largest
# entry (the tiny CLIP's conditioning), in float32 (u = 6e-8: 2.6e-5, near any fixed float32
# tolerance) and float64 (u = 1.1e-16: 8.5e-14) alike. The tests run in float64 and allow
# 1e-9 of the largest entry: ~1e7 u, room for any CPU's kernels and op order, while a wrong
# example, clip or scale moves a gradient by O(1) of it.
F64_RELATIVE = 1e-9


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| <= F64_RELATIVE * max |want| (float64 rounding; see above)."""
    assert got.dtype == want.dtype == torch.float64
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= F64_RELATIVE * scale, (error, scale)


@pytest.mark.parametrize(
    ("method", "pixels"),
    [("flora", False), ("flora", True), ("fedlc", False), ("fedaa", False)],
)
def test_per_example_gradients_equal_one_backward_per_example(
    method, pixels, make_flora, tiny_clip
):
    if method == "flora":
        model = flora_with_nonzero_b(make_flora).double()
    else:
        model = baseline(tiny_clip, method).double()
    features, labels = features_and_labels(model, n=4 if pixels else 6, pixels=pixels)
    features = features.double()
    grads, losses = per_example_gradients(model, features, labels)
    params = optimized_named_parameters(model)
    assert set(grads) == set(params) and params
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(class_logits(model, features[i : i + 1]), labels[i : i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=F64_RELATIVE)
        for name, param in params.items():
            assert grads[name].shape == (len(labels), *param.shape)
            assert_close_to_scale(grads[name][i], param.grad)
        assert any(param.grad.abs().sum() > 0 for param in params.values())


def test_chunked_per_example_gradients_equal_the_whole_batch(make_flora):
    model = flora_with_nonzero_b(make_flora).double()  # float64: batch 5 vs chunks of 2
    features, labels = features_and_labels(model, n=5)
    whole, whole_losses = per_example_gradients(model, features.double(), labels)
    chunked, chunked_losses = per_example_gradients(model, features.double(), labels, chunk_size=2)
    assert_close_to_scale(chunked_losses, whole_losses)
    for name, grads in whole.items():
        assert_close_to_scale(chunked[name], grads)


def test_clipped_per_example_norms_never_exceed_the_bound():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-4, 0.3, 0.999, 1.0, 2.0, 50.0, 1e4])
    grads = {
        "a": torch.randn(7, 3, 4, generator=gen),
        "b": torch.randn(7, 5, generator=gen),
    }
    norms = per_example_norms(grads)
    grads = {k: g * (scales / norms).view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}
    torch.testing.assert_close(per_example_norms(grads), scales)
    factors = clip_factors(per_example_norms(grads), max_grad_norm=1.0)
    assert ((factors * scales) <= 1.0 + 1e-6).all()  # float32 rounding
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(1e-4, rel=1e-6)
    # One example at a time, no noise: the private gradient is that example's clipped one.
    for i in range(len(scales)):
        single = {k: g[i : i + 1] for k, g in grads.items()}
        out = private_gradient(single, 1.0, 0.0, torch.Generator())
        assert per_example_norms({k: v[None] for k, v in out.items()}).item() <= 1.0 + 1e-6


def test_noise_std_is_sigma_clip_over_batch():
    batch, sigma, clip = 4, 1.2, 0.5
    grads = {"w": torch.zeros(batch, 100_000), "v": torch.zeros(batch, 50, 20)}
    out = private_gradient(grads, clip, sigma, torch.Generator().manual_seed(1))
    noise = torch.cat([t.flatten() for t in out.values()])
    assert noise.std().item() == pytest.approx(sigma * clip / batch, rel=0.02)
    assert abs(noise.mean().item()) < 4 * sigma * clip / batch / math.sqrt(noise.numel())
    again = private_gradient(grads, clip, sigma, torch.Generator().manual_seed(1))
    assert all(torch.equal(out[k], again[k]) for k in out)


def private_trainer(make_flora, datamodule, seed=42):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    datamodule.setup("fit")
    model = flora_with_nonzero_b(make_flora)
    model.configure_task(datamodule.class_names, datamodule.template)
    datamodule.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    cache = FeatureCache(fabric, model, datamodule)
    cache.build([0], test=False)
    step = DPSGDStep(noise_multiplier=1.0, max_grad_norm=0.5)
    trainer = LocalTrainer(fabric, max_local_steps=3, seed=seed, step_fn=step)
    return trainer, model, cache, step


def test_private_fit_on_cached_features_is_reproducible_by_seed(make_flora, datamodule):
    trainer, model, cache, step = private_trainer(make_flora, datamodule)
    start = {k: v.clone() for k, v in model.communicated_state().items()}
    update = trainer.fit(model, datamodule, client=0, round_=1, source=cache)
    assert step.steps == local_steps(datamodule.num_samples(0), datamodule.batch_size, 1, 3)
    assert math.isfinite(update.train_loss) and update.train_loss > 0
    assert any(not torch.equal(start[k], update.state[k]) for k in start)

    again_trainer, again_model, again_cache, _ = private_trainer(make_flora, datamodule)
    again = again_trainer.fit(again_model, datamodule, client=0, round_=1, source=again_cache)
    assert all(torch.equal(update.state[k], again.state[k]) for k in start)

    other_trainer, other_model, other_cache, _ = private_trainer(make_flora, datamodule, seed=7)
    other = other_trainer.fit(other_model, datamodule, client=0, round_=1, source=other_cache)
    assert any(not torch.equal(update.state[k], other.state[k]) for k in start)


def test_a_gradient_scaler_is_refused():
    fabric = SimpleNamespace(strategy=SimpleNamespace(precision=SimpleNamespace(scaler=object())))
    with pytest.raises(ValueError, match="trainer.precision bf16-mixed or 32-true"):
        DPSGDStep(1.0, 1.0)(fabric, None, None, (None, None), 0)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="privacy.noise_multiplier"):
        DPSGDStep(-1.0, 1.0)
    with pytest.raises(ValueError, match="privacy.max_grad_norm"):
        DPSGDStep(1.0, 0.0)
    with pytest.raises(ValueError, match="privacy.per_example_chunk"):
        DPSGDStep(1.0, 1.0, chunk_size=0)


def test_from_config_carries_the_privacy_settings():
    from flora_lightning.privacy import PrivacyConfig

    privacy = PrivacyConfig(
        level="sample", target_epsilon=4.0, max_grad_norm=0.3, per_example_chunk=8
    )
    step = DPSGDStep.from_config(privacy, noise_multiplier=1.7)
    assert (step.noise_multiplier, step.max_grad_norm, step.chunk_size) == (1.7, 0.3, 8)


class LinearCaptions(torch.nn.Module):
    """A tiny stand-in method for :class:`DPSGDStep`: logits ``x Wᵀ`` (features against one
    trainable "caption" row per class), so each example's gradient has a closed form."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def encode_images(self, inputs):
        return inputs

    def logit_scale(self):
        return torch.tensor(1.0)

    def class_text_features(self):
        return self.weight

    def optimized_parameters(self):
        return [self.weight]


def hand_dpsgd_update(weight, x, y, clip, sigma, seed, divisor):
    """``W - (Σ_i clip(g_i) + σ C ξ) / divisor`` (SGD, lr 1) with ``g_i = (softmax(W x_i) -
    e_{y_i}) x_iᵀ``, the cross-entropy gradient, and ξ the first normal draw of ``seed``."""
    summed = torch.zeros_like(weight)
    for xi, yi in zip(x, y, strict=True):
        residual = torch.softmax(weight @ xi, dim=0) - F.one_hot(yi, weight.shape[0]).float()
        g = torch.outer(residual, xi)
        summed += g * min(1.0, clip / (g.norm().item() + 1e-6))
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return weight - (summed + sigma * clip * noise) / divisor


@pytest.mark.parametrize("drawn", [3, 0])
def test_a_poisson_step_divides_by_the_expected_batch_size(drawn):
    """A drawn batch of 3 (or an empty one) at q n = 8 is divided by 8, as Opacus'
    ``expected_batch_size``; an empty one steps on the noise alone."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 5, generator=gen)
    x, y = torch.randn(drawn, 5, generator=gen), torch.randint(0, 4, (drawn,), generator=gen)
    module = LinearCaptions(weight)
    step = DPSGDStep(noise_multiplier=0.7, max_grad_norm=0.5)
    sampler = step.batch_sampler(40, 8, 5, torch.Generator())
    assert sampler.expected_batch_size == 8 == step.expected_batch_size
    step.start_fit(seed=11)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    loss = step(L.Fabric(accelerator="cpu", devices=1), module, optimizer, (x, y), 0)
    expected = hand_dpsgd_update(weight, x, y, clip=0.5, sigma=0.7, seed=11, divisor=8)
    # float32 sums of 3 terms and a softmax: a few ulps of values O(1).
    torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    if drawn:
        hand_loss = F.cross_entropy(x @ weight.T, y).item()
        assert loss.item() == pytest.approx(hand_loss, rel=1e-5)
    else:
        assert loss.item() == 0.0 and step.steps == 1


def test_shuffle_sampling_warns_and_divides_by_the_batch():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 5, generator=gen)
    x, y = torch.randn(3, 5, generator=gen), torch.randint(0, 4, (3,), generator=gen)
    with pytest.warns(UserWarning, match="privacy.sampling=shuffle.*approximation"):
        step = DPSGDStep(noise_multiplier=0.7, max_grad_norm=0.5, sampling="shuffle")
    assert step.batch_sampler(40, 8, 5, torch.Generator()) is None
    module = LinearCaptions(weight)
    step.start_fit(seed=11)
    step(L.Fabric(accelerator="cpu", devices=1), module, torch.optim.SGD([module.weight], lr=1.0),
         (x, y), 0)  # fmt: skip
    expected = hand_dpsgd_update(weight, x, y, clip=0.5, sigma=0.7, seed=11, divisor=3)
    torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="privacy.sampling"):
        DPSGDStep(1.0, 1.0, sampling="uniform")


def batch_recorder(monkeypatch) -> list[tuple[int, list[int]]]:
    """Spy on DPSGDStep: (batch size, labels) of every step it takes."""
    seen = []
    original = DPSGDStep.__call__

    def spy(self, fabric, module, optimizer, batch, batch_idx):
        seen.append((len(batch[1]), batch[1].tolist()))
        return original(self, fabric, module, optimizer, batch, batch_idx)

    monkeypatch.setattr(DPSGDStep, "__call__", spy)
    return seen


def test_a_private_fit_draws_poisson_batches_cached_or_not(make_flora, datamodule, monkeypatch):
    """The fit's batches are the Poisson draw of its data-order seed, q = batch / n, for
    ceil(n / batch) steps (what the accountant counts); pixels and cached features alike."""
    seen = batch_recorder(monkeypatch)
    trainer, model, cache, step = private_trainer(make_flora, datamodule)
    trainer.max_local_steps = None  # a full epoch
    start = model.communicated_state()
    trainer.fit(model, datamodule, client=0, round_=2, source=cache)
    by_features = list(seen)

    n, batch = datamodule.num_samples(0), datamodule.batch_size
    generator = torch.Generator().manual_seed(trainer.seed_for(2, 0, 1))
    labels = cache.features["0"][1]
    expected = []
    for _ in range(math.ceil(n / batch)):
        drawn = (torch.rand(n, generator=generator) < batch / n).nonzero().flatten()
        expected.append((len(drawn), labels[drawn].tolist()))
    assert by_features == expected
    assert step.steps == local_steps(n, batch, 1, None) == len(expected)
    assert len({size for size, _ in expected}) > 1  # sizes vary (fixed batches: 32, 32, rest)

    seen.clear()
    model.load_communicated_state(start)
    trainer.max_local_steps = 3  # pixels: a per-example vision forward, keep it short
    trainer.fit(model, datamodule, client=0, round_=2)  # no cache: the pixel loader
    assert seen == by_features[:3]


def test_a_private_pixel_fit_preprocesses_uint8_batches_on_the_device(make_flora, make_datamodule):
    """``data.preprocess: device`` under DP-SGD: each uint8 batch is preprocessed once, before
    the per-example ``vmap``, to exactly the pixels of the same transform run per image in
    the loader: the same private update, bit for bit."""
    from flora_lightning.clip.preprocess import decode_image

    updates = []
    for preprocess in ("device", "processor"):
        data = make_datamodule(preprocess=preprocess)
        trainer, model, _, _ = private_trainer(make_flora, data)
        data.set_image_transform(  # processor mode: the device transform, image by image
            lambda image, model=model: model.device_preprocess(decode_image(image)[None])[0]
        )
        trainer.max_local_steps = 1  # pixels: a per-example vision forward, keep it short
        updates.append(trainer.fit(model, data, client=0, round_=1))  # no cache: pixels
    device, processor = updates
    assert math.isfinite(device.train_loss) and device.train_loss == processor.train_loss
    assert all(torch.equal(device.state[k], processor.state[k]) for k in device.state)
