"""``BatchedStep``: one local step of K clients in one forward and one backward.

The K clients' padded batches; the text tower once for every client's captions
(:func:`~flora_lightning.federation.grouped_lora.grouped_caption_features`: the frozen matmuls
on all K clients' rows, each client's LoRA on its own); the rest of each client's loss vmapped
over its own head or adapter (FLoRA has none: its contrastive loss takes the client dimension
as it is); one backward of the sum of the K independent losses, so client k's gradient is its
own loss's; FedProx's term per client; a lower-rank client's slots beyond its rank zeroed;
one :class:`~flora_lightning.federation.batched_adam.BatchedAdam` step for the clients still
training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, vmap

from flora_lightning.federation.batched_loss import ClientObjective, pad_rows, union_labels
from flora_lightning.federation.grouped_lora import grouped_caption_features, lora_linears


class BatchedStep:
    """One local step of several clients: their padded batches, one forward (the text tower
    once for every client's captions with :func:`grouped_caption_features`; the rest of each
    client's loss vmapped over its own head or adapter), one backward of the sum of the
    clients' independent losses (client k's gradient is its own loss's), one
    :class:`BatchedAdam` step.

    Args:
        model: the method (holds the frozen weights and the clients' starting state).
        names: the trainable parameters' names, in the order of the stacked tensors.
        mu: FedProx's ``mu`` (0: none).
        fabric: the trainer's Fabric (its autocast).
    """

    def __init__(self, model, names: Sequence[str], mu: float, fabric) -> None:
        self.model, self.names, self.mu, self.fabric = model, list(names), mu, fabric
        self.objective = ClientObjective(model)
        self.lora = [
            i for i, n in enumerate(self.names) if ".lora_A." in n or ".lora_B." in n
        ]  # the text tower's adapters: encoded grouped
        self.others = [i for i in range(len(self.names)) if i not in self.lora]
        self.linears = lora_linears(model) if self.lora else {}  # once per fit, not per step

    def client_loss(self, params, features, labels, valid, captions) -> torch.Tensor:
        """One client's loss (vmapped) with its non-LoRA trainable parameters swapped in."""
        swapped = {f"model.{self.names[i]}": p for i, p in zip(self.others, params, strict=True)}
        return functional_call(self.objective, swapped, (features, labels, valid, captions))

    def captions(self, params, union, inverse) -> torch.Tensor | None:
        """Each client's per-row caption features ``[K, B, D]`` (None: a head's loss)."""
        if self.objective.kind != "contrastive":
            return None
        if self.lora:
            weights = {self.names[i]: params[i] for i in self.lora}
            txt = grouped_caption_features(self.model, self.linears, weights, union, len(inverse))
            return txt.gather(1, inverse[..., None].expand(-1, -1, txt.shape[-1]))
        return self.model.class_text_features(union)[inverse]  # frozen captions (FedAA)

    def __call__(self, stacked, anchors, masks, adam, batches: dict) -> dict[int, torch.Tensor]:
        """One local step of the clients in ``batches`` (client row -> its batch)."""
        rows = list(batches)
        width = max(len(batches[k][1]) for k in rows)
        union, inverse = union_labels([batches[k][1] for k in rows])
        device = stacked[0].device
        index = torch.tensor(rows, device=device)
        features = torch.stack([pad_rows(batches[k][0], width) for k in rows])
        labels = torch.stack([pad_rows(batches[k][1][:, None], width)[:, 0] for k in rows])
        inverse = torch.stack([pad_rows(i[:, None], width)[:, 0] for i in inverse])
        valid = torch.stack([torch.arange(width, device=device) < len(batches[k][1]) for k in rows])
        params = [p.index_select(0, index).requires_grad_() for p in stacked]
        with self.fabric.autocast():
            captions = self.captions(params, union, inverse)
            if self.others:  # a head or adapter per client: the loss vmapped over them
                others = tuple(params[i] for i in self.others)
                in_dims = (0, 0, 0, 0, None if captions is None else 0)
                losses = vmap(self.client_loss, in_dims=in_dims)(
                    others, features, labels, valid, captions
                )
            else:  # FLoRA: the contrastive loss takes the client dim as it is
                losses = self.objective(features, labels, valid, captions)
            total = losses.sum()
            if self.mu > 0:  # FedProx: mu/2 ||w - w_global||^2 per client, as ProximalTerm
                total = total + self.mu / 2 * sum(
                    (p - a.index_select(0, index)).pow(2).sum()
                    for p, a in zip(params, anchors, strict=True)
                )
        grads = torch.autograd.grad(total, params, allow_unused=True)
        active = torch.zeros(len(stacked[0]), dtype=torch.bool, device=device)
        active[index] = True
        full = [
            torch.zeros_like(p).index_copy_(0, index, g) if g is not None else torch.zeros_like(p)
            for p, g in zip(stacked, grads, strict=True)
        ]
        if masks is not None:  # a lower-rank client's slots beyond its rank: zero gradient
            full = [g * m if m is not None else g for g, m in zip(full, masks, strict=True)]
        adam.step(full, active)
        return dict(zip(rows, losses.detach().unbind(), strict=True))
