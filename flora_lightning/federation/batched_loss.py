"""The local loss of one client on a padded batch, written to run under ``torch.func.vmap``.

``trainer.parallel_clients`` pads the K clients' batches of a step to one length ``B`` (the
last batch of a partition is shorter; one client's batches may be 32 rows, another's 7) and
vmaps the per-client loss over the stacked trainable parameters. Each client's loss must equal
the method's own ``training_step`` on its real rows alone:

- CLIP's symmetric contrastive loss (FLoRA, FedAA) is not a per-row mean: every row's softmax
  runs over the batch. Padded rows and columns of the ``[B, B]`` logits are filled with the
  dtype's lowest finite value, whose ``exp`` underflows to exactly 0 next to any real logit, so
  a real row's (column's) log-sum-exp is its unpadded one; the loss is the mean over real rows
  (columns) only. A fully padded row stays finite (no NaN in the gradient) and is left out.
- Cross-entropy of a linear head (FedLC) is a per-row mean: the mean over real rows.

Caption features are encoded once per step for the union of the K batches' labels with each
client's adapters (:mod:`~flora_lightning.federation.grouped_lora`) and indexed per client: the
same per-caption features the sequential fit encodes for its own batch's labels. The loss here
takes them as an input, so only the small per-client part (image features, a head or adapter,
the loss) runs under ``vmap``.

Only methods whose loss is known here train in parallel (:func:`loss_kind`); a subclass that
overrides ``forward`` or ``training_step`` is refused, since its loss may differ.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from flora_lightning.methods.fedaa import FedAA
from flora_lightning.methods.fedlc import FedLC
from flora_lightning.methods.flora import FLoRA

LossKind = Literal["contrastive", "cross_entropy"]

KINDS: dict[type, LossKind] = {FLoRA: "contrastive", FedAA: "contrastive", FedLC: "cross_entropy"}
"""The methods whose local loss :class:`ClientObjective` reproduces exactly."""


def loss_kind(model) -> LossKind | None:
    """The loss form of ``model`` (None: not one this module reproduces: refuse)."""
    return KINDS.get(type(model))


def masked_contrastive(
    img: torch.Tensor, txt: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric loss over the real rows of a padded batch (see the module docstring).

    Args:
        img: normalised image features ``[..., B, D]`` (leading dims: clients, one loss each).
        txt: normalised caption features of each row's class ``[..., B, D]``.
        valid: bool ``[..., B]``, true for real rows.
        scale: the logit scale (``exp`` of CLIP's, frozen).
    """
    logits = scale * img @ txt.transpose(-1, -2)
    pair = valid[..., :, None] & valid[..., None, :]
    logits = torch.where(pair, logits, torch.finfo(logits.dtype).min)
    diag = torch.diagonal(logits, dim1=-2, dim2=-1)
    rows = torch.logsumexp(logits, dim=-1) - diag
    cols = torch.logsumexp(logits, dim=-2) - diag
    count = valid.sum(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    row_mean = torch.where(valid, rows, zero).sum(-1) / count
    col_mean = torch.where(valid, cols, zero).sum(-1) / count
    return (row_mean + col_mean) / 2


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the real rows (``F.cross_entropy``'s mean on those rows)."""
    per_row = torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(valid, per_row, zero).sum() / valid.sum()


class ClientObjective(torch.nn.Module):
    """One client's loss on its padded batch and caption features, with the model's head or
    adapter swapped in by ``torch.func.functional_call`` (parameter names get the prefix
    ``model.``).

    Args:
        model: a method :func:`loss_kind` knows.
    """

    def __init__(self, model) -> None:
        super().__init__()
        kind = loss_kind(model)
        if kind is None:
            raise ValueError(f"{type(model).__name__} has no batched loss here.")
        self.model = model
        self.kind: LossKind = kind

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        captions: torch.Tensor | None,
    ) -> torch.Tensor:
        """The client's loss.

        Args:
            features: cached image features ``[B, D]`` (padded rows: anything finite); with
                leading client dims ``[K, B, D]`` for the contrastive loss, one loss per client.
            labels: ``[B]`` class ids (padded rows: any valid id).
            valid: bool ``[B]``, true for real rows.
            captions: normalised caption features of each row's class ``[B, D]`` (the
                contrastive loss; None for a head's cross-entropy).
        """
        model = self.model
        # per-row image encoders see rows [N, D] (leading client dims, if any, flattened)
        images = model.encode_images(features.reshape(-1, features.shape[-1]))
        images = images.reshape(*features.shape[:-1], images.shape[-1])
        if self.kind == "cross_entropy":
            return masked_cross_entropy(model.head_logits(images), labels, valid)
        return masked_contrastive(images, captions, valid, model.logit_scale())


def union_labels(labels: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sorted distinct labels of all ``labels`` and, per batch, each row's index in it."""
    union, inverse = torch.unique(torch.cat(labels), return_inverse=True)
    return union, list(torch.split(inverse, [len(y) for y in labels]))


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows``."""
    extra = rows - tensor.shape[0]
    if extra == 0:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, extra))
