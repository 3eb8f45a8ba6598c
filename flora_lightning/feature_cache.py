"""Frozen-feature caching: encode each client's images once, then train from the features.

When a method keeps the image encoder frozen and there is no augmentation (FLoRA on the text
tower, FedLC, FedAA), a client's normalised image features are a fixed function of its data.
Computing them once (batched, under the run's precision) and training from them gives the same
loss and the same update as the uncached path, without a vision forward pass per step. After
every client and the test set are encoded, the vision tower can leave memory.

The cached loader yields ``(features [B, D], labels)`` batches in exactly the order the
uncached loader yields ``(pixels, labels)``: both shuffle ``range(n)`` with the same generator.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from flora_lightning.checkpoint import load_state, save_state


class FeatureCache:
    """Normalised image features per client partition and for the global test set.

    With ``data.local_test_fraction`` set, each built client's local test set is encoded too
    (:meth:`client_test_dataloader`), under the key ``local_test/<client>``.

    Args:
        fabric: the loop's Fabric (device and precision).
        model: a method whose ``image_encoder_frozen`` is true.
        datamodule: the federated data (already set up).
        disk_dir: optional folder to persist features across runs, keyed by a fingerprint of
            model, data, partition and preprocessing.
    """

    def __init__(self, fabric, model, datamodule, disk_dir: str | None = None) -> None:
        self.fabric = fabric
        self.model = model
        self.data = datamodule
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fingerprint(self, parts: list[str]) -> str:
        """Model + data + partition + preprocessing + precision + which ``parts``, hashed."""
        vision = self.model.clip_model().vision_model
        weights = hashlib.sha256()
        for name, tensor in vision.state_dict().items():
            weights.update(name.encode())
            weights.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
        key = {
            "model": self.model.name_or_path,
            "vision": weights.hexdigest(),
            "data": self.data.fingerprints()["train"],
            "test": self.data.fingerprints()["test"],
            "partition": [
                hashlib.sha256(i.tobytes()).hexdigest() for i in self.data.client_indices
            ],
            "transform": repr(self.data.image_transform),
            "precision": str(self.fabric.strategy.precision.__class__.__name__),
            "parts": parts,
        }
        if self.data.has_local_test:  # absent otherwise: older disk caches stay valid
            key["local_test"] = [
                hashlib.sha256(i.tobytes()).hexdigest() for i in self.data.client_test_indices
            ]
        # A method that caches other features than the default normalised ones (FedAA: the
        # raw projection) must not share a disk cache with the others.
        if self.model.cached_features_kind is not None:
            key["features"] = self.model.cached_features_kind
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def build(self, clients: list[int], test: bool = True) -> None:
        """Encode the given clients' partitions (and local test sets, when the data has them)
        and (with ``test``) the test set, or read them from disk."""
        parts = [str(c) for c in clients] + (["test"] if test else [])
        path = self.disk_dir / f"{self.fingerprint(parts)}.safetensors" if self.disk_dir else None
        if path is not None and path.exists():
            flat = load_state(path)
            self.features.update(
                {k[:-2]: (flat[k], flat[k[:-2] + ".y"]) for k in flat if k.endswith(".x")}
            )
            return
        before = set(self.features)
        for client in clients:
            self.features[str(client)] = self._encode(self.data.client_dataset(client))
            if self.data.has_local_test:
                self.features[self.local_test_key(client)] = self._encode(
                    self.data.client_test_dataset(client)
                )
        if test:
            self.features["test"] = self._encode(self.data.test_set)
        if path is not None:  # what this call encoded, under its own fingerprint
            flat = {}
            for key in self.features.keys() - before:
                flat[f"{key}.x"], flat[f"{key}.y"] = self.features[key]
            save_state(flat, path)

    @torch.no_grad()
    def _encode(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(
            dataset,
            batch_size=self.data.eval_batch_size,
            shuffle=False,
            num_workers=self.data.num_workers,
            collate_fn=self.data.collate,
        )
        feats, labels = [], []
        self.model.eval()
        with self.fabric.autocast():
            for pixels, y in loader:
                x = self.model.frozen_image_features(self.fabric.to_device(pixels))
                feats.append(x.float())
                labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    def client_dataloader(self, client: int, generator: torch.Generator) -> DataLoader:
        x, y = self.features[str(client)]
        return DataLoader(
            TensorDataset(x, y), batch_size=self.data.batch_size, shuffle=True, generator=generator
        )

    @staticmethod
    def local_test_key(client: int) -> str:
        """The :attr:`features` key of a client's local test set."""
        return f"local_test/{client}"

    def client_test_dataloader(self, client: int) -> DataLoader:
        """A client's cached local test features, in order (for evaluation)."""
        key = self.local_test_key(client)
        if key not in self.features:
            raise KeyError(
                f"client {client}'s local test set is not cached: set data.local_test_fraction "
                "and build the cache with this client."
            )
        x, y = self.features[key]
        return DataLoader(TensorDataset(x, y), batch_size=self.data.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        x, y = self.features["test"]
        return DataLoader(TensorDataset(x, y), batch_size=self.data.eval_batch_size)
