"""Sample-level DP-SGD for a client's local fit: per-example clipping and Gaussian noise.

For a batch with per-example gradients ``g_i`` over the optimized parameters (all of them
flattened together), one step uses (Abadi et al., 2016)

    ḡ = ( Σ_i g_i · min(1, C / (||g_i||₂ + 1e-6)) + N(0, (σ C)² I) ) / L

with ``C = privacy.max_grad_norm`` and ``σ = privacy.noise_multiplier`` (Opacus' clip factor,
``+1e-6`` included), then the local optimizer (Adam) steps on ``ḡ``. The noise comes from a
generator seeded per client fit, so a DP run is reproducible by seed.

**Batches** (``privacy.sampling``). ``poisson`` (default, the released code's: Opacus'
``make_private`` defaults to Poisson sampling): :meth:`DPSGDStep.batch_sampler` gives the fit a
:class:`~flora_lightning.privacy.poisson.PoissonBatchSampler` (each example joins each step with
probability ``q = batch_size / n``), and ``L = q n``, the *expected* batch size, whatever size
was drawn (an empty batch still steps on pure noise), as Opacus' ``expected_batch_size``: the
mechanism the accountant bounds. ``shuffle``: fixed-size batches of a shuffled epoch and
``L`` = the batch's size; the accountant's Poisson bound is then an approximation, not a bound.

**The per-example loss.** The methods' usual loss is CLIP's in-batch contrastive loss, in which
an example's loss depends on the other examples of its batch (they are its negatives): it has no
per-example gradient, and clipping each row would not bound one example's influence. Under
DP-SGD every method trains instead on the decomposable zero-shot classification loss, each image
against all class captions (:func:`class_logits`), which is what evaluation measures:

    ℓ_i = CE(s · f̂(x_i) · Ĝᵀ, y_i)     (FedLC/FedVMLC: CE of their head's logits, as they train)

**Why ``torch.func`` and not Opacus.** FLoRA's trainable part is LoRA in the *text* tower: its
layers see one row per class caption, not one per example. Opacus' ``GradSampleModule`` computes
per-sample gradients layer by layer from each layer's own batch rows, so it would return
per-caption gradients (wrong), and its functorch fallback makes the same assumption. Here
``vmap(grad(ℓ))`` over the examples, with ``functional_call`` on the optimized parameters only,
differentiates the whole per-example loss (text tower included) exactly: the caption forward is
shared (unbatched under ``vmap``), the backward runs batched. It works on cached features
``[B, D]`` and on pixels alike. Memory is ``B x`` the optimized parameters (LoRA: tiny).
Opacus remains the accountant (``accountant.py``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from flora_lightning.privacy.poisson import PoissonBatchSampler

CLIP_EPS = 1e-6
"""Added to each per-example norm before dividing (Opacus' value)."""


def class_logits(module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, num_classes]`` of images (pixels or cached features) against every class,
    with gradients: the decomposable loss DP-SGD trains on.

    FedLC and FedVMLC classify with their head (their own training loss); the other methods
    compare the normalised image embedding with every class caption embedding, scaled by
    ``logit_scale`` (the same logits as their evaluation).
    """
    from flora_lightning.methods.fedlc import FedLC

    images = module.encode_images(inputs)
    if isinstance(module, FedLC):
        return module.head_logits(images)
    return module.logit_scale() * images @ module.class_text_features().T


class _PerExampleLoss(torch.nn.Module):
    """``forward(x, y)``: one example's loss, so ``functional_call`` can swap parameters."""

    def __init__(self, method) -> None:
        super().__init__()
        self.method = method

    def forward(self, inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = class_logits(self.method, inputs.unsqueeze(0))
        return F.cross_entropy(logits, label.unsqueeze(0))


def optimized_named_parameters(module) -> dict[str, torch.nn.Parameter]:
    """The parameters the local optimizer updates (``optimized_parameters``), by name."""
    wanted = {id(p) for p in module.optimized_parameters()}
    return {n: p for n, p in module.named_parameters() if id(p) in wanted}


def per_example_gradients(
    module, inputs: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients of :func:`class_logits`' cross-entropy, and the losses.

    Args:
        module: the method (as :class:`~flora_lightning.federation.local_trainer.LocalTrainer` passes it).
        inputs: cached features ``[B, D]`` or pixels ``[B, 3, H, W]``.
        labels: class ids ``[B]``.
        chunk_size: examples differentiated at once (``vmap``'s ``chunk_size``); the backward
            through a trainable text tower holds ``chunk x classes`` caption activations, so
            large batches with many classes need it. None: the whole batch.

    Returns:
        name -> gradient ``[B, *param.shape]`` for every optimized parameter, and the
        per-example losses ``[B]`` (detached).
    """
    wrapper = _PerExampleLoss(module)
    params = {f"method.{n}": p.detach() for n, p in optimized_named_parameters(module).items()}
    if len(labels) == 0:  # an empty Poisson batch: no example, no gradient
        grads = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return {n.removeprefix("method."): g for n, g in grads.items()}, labels.new_zeros(0).float()

    def loss(p, x, y):
        value = functional_call(wrapper, p, (x, y), strict=False)
        return value, value

    per_example = vmap(
        grad(loss, has_aux=True),
        in_dims=(None, 0, 0),
        randomness="different",
        chunk_size=chunk_size,
    )
    grads, losses = per_example(params, inputs, labels)
    return {n.removeprefix("method."): g for n, g in grads.items()}, losses.detach()


def per_example_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: each example's gradient norm over all parameters together."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` per example (Opacus' flat clipping)."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def private_gradient(
    grads: dict[str, torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    expected_batch_size: float | None = None,
) -> dict[str, torch.Tensor]:
    """``(Σ_i clip(g_i) + N(0, (σ C)²)) / L`` per parameter, noise drawn from ``generator``
    (on CPU, in parameter order, so a run is the same on any device).

    ``L`` is ``expected_batch_size`` (Poisson sampling: ``q n``, also for an empty batch), or
    the batch's own size when None (shuffled fixed-size batches).
    """
    if expected_batch_size is not None and not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0 (got {expected_batch_size}).")
    factors = None
    out = {}
    for name, g in grads.items():
        if factors is None:
            factors = clip_factors(per_example_norms(grads), max_grad_norm).to(g.dtype)
        divisor = g.shape[0] if expected_batch_size is None else expected_batch_size
        summed = torch.einsum("b,b...->...", factors, g)
        noise = torch.randn(summed.shape, generator=generator, dtype=torch.float32)
        std = noise_multiplier * max_grad_norm
        out[name] = (summed + std * noise.to(summed.device, summed.dtype)) / divisor
    return out


class DPSGDStep:
    """The local step of sample-level DP-SGD; :class:`~flora_lightning.federation.local_trainer.LocalTrainer`
    calls it instead of :func:`~flora_lightning.federation.local_trainer.local_step`.

    Args:
        noise_multiplier: σ (``privacy.noise_multiplier``, resolved from the target epsilon).
        max_grad_norm: C, each example's gradient bound (``privacy.max_grad_norm``).
        chunk_size: examples whose gradients are computed at once
            (``privacy.per_example_chunk``; None: the whole batch).
        sampling: ``poisson`` (each fit's batches from :meth:`batch_sampler`, divided by the
            expected batch size) or ``shuffle`` (the loader's shuffled fixed-size batches,
            divided by their size; the accountant's epsilon is then an approximation).
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        chunk_size: int | None = None,
        sampling: str = "poisson",
    ) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0 (got {noise_multiplier}).")
        if max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0 (got {max_grad_norm}).")
        self.noise_multiplier = noise_multiplier
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"privacy.per_example_chunk must be >= 1 or null (got {chunk_size}).")
        self.max_grad_norm = max_grad_norm
        self.chunk_size = chunk_size
        if sampling not in ("poisson", "shuffle"):
            raise ValueError(f"privacy.sampling must be poisson or shuffle (got {sampling!r}).")
        if sampling == "shuffle":
            warnings.warn(
                "privacy.sampling=shuffle: DP-SGD trains on shuffled fixed-size batches, but "
                "the reported epsilon is the Poisson-subsampling bound at q = batch_size / n, "
                "an approximation for these batches, not a guarantee; privacy.sampling=poisson "
                "(the default, as the released code) makes it a bound.",
                UserWarning,
                stacklevel=2,
            )
        self.sampling = sampling
        self.expected_batch_size: float | None = None
        """What the noisy sum is divided by in this fit (Poisson); None: each batch's size."""
        self.generator = torch.Generator()
        self.steps = 0
        """Steps since the last :meth:`start_fit` (what the accountant composes for a fit)."""

    @classmethod
    def from_config(cls, privacy, noise_multiplier: float) -> DPSGDStep:
        """The step of a sample-level :class:`~flora_lightning.privacy.config.PrivacyConfig`,
        with its noise multiplier resolved (given, or from ``target_epsilon``)."""
        return cls(
            noise_multiplier, privacy.max_grad_norm, privacy.per_example_chunk, privacy.sampling
        )

    def batch_sampler(
        self, num_samples: int, batch_size: int, steps: int, generator: torch.Generator
    ) -> PoissonBatchSampler | None:
        """The batches of one client fit: Poisson at ``q = batch_size / num_samples`` for
        ``steps`` steps per epoch from ``generator``, and :attr:`expected_batch_size` set to
        ``q n``; None with ``sampling=shuffle`` (the loader's own shuffled batches)."""
        if self.sampling == "shuffle":
            self.expected_batch_size = None
            return None
        sampler = PoissonBatchSampler(num_samples, batch_size, steps, generator)
        self.expected_batch_size = sampler.expected_batch_size
        return sampler

    def start_fit(self, seed: int) -> None:
        """Reset for one client fit: its noise generator (seeded) and step count."""
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def __call__(self, fabric, module, optimizer, batch, batch_idx: int) -> torch.Tensor:
        """One DP-SGD step on ``batch = (images or features, labels)``; returns the mean
        per-example loss (detached; 0 for an empty batch, which the trainer weighs by 0)."""
        scaler = getattr(getattr(fabric.strategy, "precision", None), "scaler", None)
        if scaler is not None:
            raise ValueError(
                "privacy.level=sample sets the gradients itself, which a 16-mixed gradient "
                "scaler would unscale again: use trainer.precision bf16-mixed or 32-true."
            )
        inputs, labels = batch
        if not torch.is_tensor(inputs) or inputs.dtype == torch.uint8:
            # decoded images (data.preprocess=device): preprocessed once for the whole batch,
            # not per example under vmap
            inputs = module.prepare_images(inputs)
        with fabric.autocast():
            grads, losses = per_example_gradients(module, inputs, labels, self.chunk_size)
        noisy = private_gradient(
            grads,
            self.max_grad_norm,
            self.noise_multiplier,
            self.generator,
            self.expected_batch_size,
        )
        params = optimized_named_parameters(module)
        for name, param in params.items():
            param.grad = noisy[name].to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return losses.float().mean() if len(losses) else losses.new_zeros(())
