"""``ClientLoaders``: the datamodule's data loaders (each client's training and local test
rows, the global test set) and the collate function that turns rows into batches.

Mixed into :class:`~flora_lightning.data.datamodule.FederatedDataModule`; reads its loaded
rows (``train_set``, ``test_set``, ``client_indices``, ``client_test_indices``) and settings
(``batch_size``, ``eval_batch_size``, ``num_workers``, ``preprocess``, the columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from flora_lightning.clip.preprocess import decode_image, stack_images


class ClientLoaders:
    """Loaders over the federated data (see the module docstring)."""

    def set_image_transform(self, transform: Callable) -> None:
        """The model's own preprocessing (CLIP resize, crop, normalise)."""
        self.image_transform = transform

    def collate(self, rows: list[dict]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Dataset rows -> ``(pixels, labels [B])``.

        ``data.preprocess: processor``: float pixels ``[B, 3, H, W]``, the model's
        preprocessing applied per image. ``device``: the decoded uint8 RGB images, one tensor
        ``[B, 3, H, W]`` (a list of ``[3, H, W]`` when their sizes differ), which the method
        preprocesses on its device (:meth:`~flora_lightning.methods.base.FederatedCLIPModule.
        prepare_images`).
        """
        labels = torch.tensor([row[self.label_column] for row in rows], dtype=torch.long)
        if self.preprocess == "device":
            images = [decode_image(row[self.image_column]) for row in rows]
            if len({image.shape for image in images}) == 1:
                return stack_images(images), labels
            return [image.contiguous() for image in images], labels
        pixels = torch.stack([self.image_transform(row[self.image_column]) for row in rows])
        return pixels, labels

    def train_rows(self, indices):
        """The training-set rows at ``indices``, in that order (one ``datasets`` selection)."""
        return self.train_set.select(indices)

    def client_dataset(self, client_id: int):
        return self.train_rows(self.client_indices[client_id])

    def client_dataloader(
        self, client_id: int, generator: torch.Generator, batch_sampler=None
    ) -> DataLoader:
        """Shuffled loader over one client's partition; ``generator`` fixes the order.

        With ``batch_sampler`` (sample-level DP-SGD's
        :class:`~flora_lightning.privacy.poisson.PoissonBatchSampler`) it draws the batches
        instead, as the cached-feature loader does with the same sampler.
        """
        if batch_sampler is not None:
            # imported on use: the privacy package loads Opacus, which data-only users skip
            from flora_lightning.privacy.poisson import poisson_loader

            return poisson_loader(
                self.client_dataset(client_id), batch_sampler, self.collate, self.num_workers
            )
        return DataLoader(
            self.client_dataset(client_id),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def client_test_dataset(self, client_id: int):
        """One client's local test set (``data.local_test_fraction`` of its partition)."""
        if not self.has_local_test:
            raise ValueError(
                "data.local_test_fraction is null (and no client test paths): clients hold no "
                "local test sets. Set it, "
                "e.g. --data.local_test_fraction 0.2, for personalised evaluation."
            )
        return self.train_rows(self.client_test_indices[client_id])

    def client_test_dataloader(self, client_id: int) -> DataLoader:
        """Loader over one client's local test set, in order (for evaluation)."""
        return DataLoader(
            self.client_test_dataset(client_id),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )
