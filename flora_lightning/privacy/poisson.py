"""Poisson sampling of a client's DP-SGD batches, as Opacus' ``DPDataLoader`` draws them.

The RDP/PRV accountants bound the subsampled Gaussian mechanism in which every example joins
each step independently with probability ``q``. The released code gets exactly that from
Opacus' ``make_private`` (its default ``poisson_sampling=True`` swaps the loader's sampler for
``UniformWithReplacementSampler``). :class:`PoissonBatchSampler` is the same draw::

    for each of the fit's steps:   mask = rand(n, generator) < q;   batch = nonzero(mask)

with ``q = batch_size / n`` (:func:`sample_rate`, the rate the accountant composes) and the
planned steps per epoch (``ceil(n / batch_size)``, what the accountant counts). Batch sizes
vary (Binomial(n, q)) and a batch may be empty; the DP-SGD step then still adds its noise and
divides by the *expected* batch size ``q n``, not the drawn one (Opacus'
``expected_batch_size``), which is what the analysis assumes.

Both of a client's loaders (pixels from the datamodule, features from the
:class:`~flora_lightning.clip.feature_cache.FeatureCache`) take the sampler through
:func:`poisson_loader`, so a cached and an uncached fit, and a Flower node and ``flora fit``,
draw the same batches from the same per-fit seed.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate


def sample_rate(num_samples: int, batch_size: int) -> float:
    """``q = min(1, batch_size / num_samples)``: each example's chance to join a step."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"Poisson sampling needs num_samples >= 1 and data.batch_size >= 1 (got "
            f"{num_samples}, {batch_size})."
        )
    return min(1.0, batch_size / num_samples)


class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` batches per pass; each holds every index independently with probability
    :attr:`sample_rate` (Opacus' ``UniformWithReplacementSampler``: one ``torch.rand(n)`` per
    step from ``generator``, kept where ``< q``).

    Every pass (epoch) continues the generator's stream, so the epochs of one fit differ.

    Args:
        num_samples: the client's examples ``n``.
        batch_size: the expected batch size before the cap (``data.batch_size``).
        steps: batches per pass (the trainer's planned steps per epoch).
        generator: the fit's seeded generator.
    """

    def __init__(
        self, num_samples: int, batch_size: int, steps: int, generator: torch.Generator
    ) -> None:
        if steps < 1:
            raise ValueError(f"PoissonBatchSampler needs steps >= 1 (got {steps}).")
        self.num_samples = num_samples
        self.sample_rate = sample_rate(num_samples, batch_size)
        self.steps = steps
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """``q n``: what the DP-SGD step divides the noisy sum by."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


class EmptyBatchCollate:
    """A collate function that also turns an empty batch into empty tensors.

    PyTorch's collate functions index the first row, which an empty Poisson batch lacks; here
    an empty batch becomes the collate of the dataset's first row cut to zero rows (the right
    shapes and dtypes, as Opacus' ``wrap_collate_with_empty``). Picklable (loader workers).
    """

    def __init__(self, collate, dataset) -> None:
        self.collate = collate
        self.dataset = dataset

    def __call__(self, rows: list):
        if rows:
            return self.collate(rows)
        template = self.collate([self.dataset[0]])
        return tuple(tensor[:0] for tensor in template)


def poisson_loader(
    dataset, batch_sampler: PoissonBatchSampler, collate=default_collate, num_workers: int = 0
) -> DataLoader:
    """A loader over ``dataset`` whose batches ``batch_sampler`` draws (empty ones included)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=EmptyBatchCollate(collate, dataset),
    )
