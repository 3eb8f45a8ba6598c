"""Frozen-feature caching: encode each client's images once, then train from the features.

When a method keeps the image encoder frozen and there is no augmentation (FLoRA on the text
tower, FedLC, FedAA), a client's normalised image features are a fixed function of its data.
Computing them once (batched, under the run's precision) and training from them gives the same
loss and the same update as the uncached path, without a vision forward pass per step. After
every client and the test set are encoded, the vision tower can leave memory.

The cached loader yields ``(features [B, D], labels)`` batches in exactly the order the
uncached loader yields ``(pixels, labels)``: both shuffle ``range(n)`` with the same generator,
or both take their batches from the same Poisson sampler (sample-level DP-SGD).

On disk (``trainer.feature_cache_dir``) each build is a folder ``<fingerprint>/`` holding
``features.safetensors`` and its checksum ``manifest.json``
(:func:`~flora_lightning.rundir.checkpoint.write_folder`). The fingerprint hashes every byte
of the vision tower's weights (once per loaded model: :func:`vision_weights_digest`), the data,
partition, preprocessing and precision. A folder that fails its checksum, or has no manifest,
is encoded again (with a warning naming what was wrong) and replaced; two processes building
one folder at once keep the first complete one.

With ``data.preprocess: device`` the loader's workers only decode; each uint8 batch moves to
the Fabric's device and is resized, cropped and normalised there, in the batch, by the method's
``frozen_image_features`` (:mod:`flora_lightning.clip.preprocess`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from flora_lightning.privacy.poisson import poisson_loader
from flora_lightning.rundir.checkpoint import load_state, save_state, write_folder
from flora_lightning.rundir.integrity import CorruptCheckpointError, verify_folder

log = logging.getLogger(__name__)

FEATURES_FILE = "features.safetensors"
"""The features of one build, inside its ``<fingerprint>/`` folder."""

_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Vision tower -> sha256 of its weights (frozen while features are cached: hashed once)."""


class _Rows(Dataset):
    """Tensors indexed a whole batch at a time (``dataset[rows]``: one gather per tensor, not
    one indexing per row and a stack): the same rows, in the same order, as a
    ``TensorDataset`` behind a batching ``DataLoader``, at a fraction of the Python cost."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(rows, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def batch_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """``DataLoader(TensorDataset(x, y), batch_size, shuffle=generator is not None,
    generator=generator)``'s batches, drawn one gather per batch: the loader draws its base
    seed from ``generator`` and the sampler its permutation after it, as the plain loader
    does, so a seeded client sees the same batches in the same order (tested)."""
    rows = _Rows(x, y)
    order = (
        SequentialSampler(rows) if generator is None else RandomSampler(rows, generator=generator)
    )
    return DataLoader(
        rows,
        batch_size=None,
        sampler=BatchSampler(order, batch_size, drop_last=False),
        generator=generator,
    )


def vision_weights_digest(vision: torch.nn.Module) -> str:
    """sha256 over every tensor of ``vision.state_dict()``: name, dtype, shape and all bytes.

    Computed once per module (a frozen image encoder does not change while its features are
    cached); a new model load is a new module and is hashed again.
    """
    digest = _digests.get(vision)
    if digest is None:
        weights = hashlib.sha256()
        for name, tensor in vision.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = _digests[vision] = weights.hexdigest()
    return digest


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
        key = {
            "model": self.model.name_or_path,
            "vision": vision_weights_digest(self.model.clip_model().vision_model),
            "data": self.data.fingerprints()["train"],
            "test": self.data.fingerprints()["test"],
            "partition": [
                hashlib.sha256(i.tobytes()).hexdigest() for i in self.data.client_indices
            ],
            "transform": repr(self.data.image_transform),
            "precision": str(self.fabric.strategy.precision.__class__.__name__),
            "parts": parts,
        }
        if self.data.preprocess == "device":  # absent for processor: older caches stay valid
            key["preprocess"] = repr(self.model.device_preprocess)
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
        folder = self.disk_dir / self.fingerprint(parts) if self.disk_dir else None
        if folder is not None and self._read(folder):
            return
        before = set(self.features)
        rows = []  # (key, training-set indices) of every part to encode
        for client in clients:
            rows.append((str(client), self.data.client_indices[client]))
            if self.data.has_local_test:
                rows.append((self.local_test_key(client), self.data.client_test_indices[client]))
        self.features.update(self._encode_rows(rows))
        if test:
            self.features["test"] = self._encode(self.data.test_set)
        if folder is not None:  # what this call encoded, under its own fingerprint
            flat = {}
            for key in self.features.keys() - before:
                flat[f"{key}.x"], flat[f"{key}.y"] = self.features[key]
            write_folder(
                folder,
                lambda tmp: save_state(flat, tmp / FEATURES_FILE),
                replace=folder.exists(),  # a damaged one is replaced; a racing build is kept
            )

    def _read(self, folder: Path) -> bool:
        """Add the features stored in ``folder`` if it verifies; False (a warning saying why,
        when it exists) to encode them again."""
        if not folder.is_dir():
            return False
        try:
            verify_folder(folder, require_manifest=True)
            flat = load_state(folder / FEATURES_FILE)
        except (CorruptCheckpointError, FileNotFoundError) as err:
            log.warning(
                "feature cache %s is not usable (%s); encoding the features again.", folder, err
            )
            return False
        self.features.update(
            {k[:-2]: (flat[k], flat[k[:-2] + ".y"]) for k in flat if k.endswith(".x")}
        )
        return True

    def _encode_rows(self, rows: list[tuple[str, np.ndarray]]) -> dict[str, tuple]:
        """Encode the training-set rows of every ``(key, indices)`` part in one pass.

        One ``datasets`` selection and one loader for all parts, not one per client (2.0 s
        instead of 3.5 s for 1,000 tiny-CLIP clients); each part is still encoded in the
        batches its own loader would make (``eval_batch_size`` rows, never across two parts),
        so its features are those of encoding it alone. Each part's features are views into
        one tensor.
        """
        if not rows:
            return {}
        size, lengths = self.data.eval_batch_size, [len(indices) for _, indices in rows]
        batches, start = [], 0
        for n in lengths:
            batches += [list(range(start + b, start + min(b + size, n))) for b in range(0, n, size)]
            start += n
        dataset = self.data.train_rows(np.concatenate([indices for _, indices in rows]))
        x, y = self._encode(dataset, batches)
        split = zip(rows, x.split(lengths), y.split(lengths), strict=True)
        return {key: (xs, ys) for (key, _), xs, ys in split}

    @torch.no_grad()
    def _encode(self, dataset, batches=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of ``dataset``, in order: in batches of ``eval_batch_size``, or
        in the given ``batches`` (lists of row positions)."""
        loader = DataLoader(
            dataset,
            batch_size=self.data.eval_batch_size if batches is None else 1,
            batch_sampler=batches,
            shuffle=False,
            num_workers=self.data.num_workers,
            collate_fn=self.data.collate,
        )
        # Written into tensors allocated once (at the first batch: the feature size), not
        # gathered and concatenated: a small tensor kept per batch among each batch's freed
        # transients left ~20 MB of heap the allocator could not return at 1,000 clients.
        feats = labels = None
        start = 0
        self.model.eval()
        with self.fabric.autocast():
            for pixels, y in loader:
                x = self.model.frozen_image_features(self.fabric.to_device(pixels))
                if feats is None:
                    feats = x.new_empty((len(dataset), *x.shape[1:]), dtype=torch.float32)
                    labels = y.new_empty((len(dataset), *y.shape[1:]))
                feats[start : start + len(x)] = x
                labels[start : start + len(y)] = y
                start += len(x)
        if feats is None:  # no rows: nothing to encode
            raise ValueError("FeatureCache: no rows to encode (an empty partition?)")
        return feats, labels

    def client_dataloader(
        self, client: int, generator: torch.Generator, batch_sampler=None
    ) -> DataLoader:
        """A client's cached features in the order the uncached loader yields its pixels:
        shuffled by ``generator``, or drawn by ``batch_sampler`` (Poisson, sample-level DP)."""
        x, y = self.features[str(client)]
        if batch_sampler is not None:
            return poisson_loader(TensorDataset(x, y), batch_sampler)
        return batch_loader(x, y, self.data.batch_size, generator)

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
        return batch_loader(x, y, self.data.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        x, y = self.features["test"]
        return batch_loader(x, y, self.data.eval_batch_size)
