"""What ``trainer.parallel_clients`` costs in memory, and K chosen from a budget; torch-free.

Training K clients in one batched step shares everything frozen (CLIP's weights, the cached
image features, the caption tokens) and multiplies what each client's step holds by K:

- **activations** kept for the backward pass: each client runs the text tower on the step's
  captions with its own adapters. Per layer and token HF's CLIP layer (eager attention, no
  dropout) saves ``20 h + a s`` elements, ``h`` the width, ``a`` the heads, ``s`` the caption
  length: both layer norms' inputs and outputs (4h), q, k, v (3h), the attention output (h),
  the MLP's hidden, its sigmoid and its activation (3 x 4h) and the attention probabilities
  (a s). ``vmap`` of the gradient and the allocator hold more than that count:
  :data:`OVERHEAD` times it, measured (FLoRA, ViT-B/32 shapes, CPU fp32, 10 captions of 8
  tokens: peak RSS grew 61 MiB per added client at K = 10 and 76 MiB at K = 20, against 40
  MiB counted). A method without a text forward per step (FedLC, FedAA) keeps only its
  head's ``rows x d`` terms;
- **adapter state**: the stacked parameters, their gradient, Adam's two moments and the step's
  two temporaries: ``6 x trainable`` elements (FLoRA at ViT-B/32, fp32: 24,576 parameters,
  0.6 MB, next to ~80 MB of activations for 10 class captions of 8 tokens).

So ``K = floor(budget / per_client)``, at least 1 and at most the round's clients. The model
is an estimate (allocator slack, kernels' workspaces): leave a margin in the budget.

Only the standard library here: ``flora`` checks the settings before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flora_lightning.finite_values import check_finite

ParallelClients = int | Literal["auto"]
"""``trainer.parallel_clients``: clients trained together per batched step, or ``auto``."""

MB = 2**20
OVERHEAD = 2.0
"""Measured activation memory over the counted one (see the module docstring), rounded up."""


@dataclass(frozen=True)
class ClientStepShape:
    """The sizes of one client's local step that its memory depends on."""

    trainable: int
    """Trainable (communicated) parameters of one client."""
    layers: int = 0
    """Text-tower layers run per step (0: no text forward, e.g. FedLC, FedAA)."""
    width: int = 0
    """Text-tower width ``h``."""
    heads: int = 0
    """Attention heads ``a``."""
    captions: int = 0
    """Captions encoded per step (at most the number of classes)."""
    tokens: int = 0
    """Tokens per caption ``s`` (the padded caption length)."""
    rows: int = 0
    """Batch rows (image features) per step."""
    feature_dim: int = 0
    """Image feature width ``d``."""
    dtype_bytes: int = 4
    """Bytes per element (4: fp32)."""


def client_step_bytes(shape: ClientStepShape) -> int:
    """Estimated bytes one client adds to a batched step (see the module docstring)."""
    per_token = 20 * shape.width + shape.heads * shape.tokens
    text = OVERHEAD * shape.layers * shape.captions * shape.tokens * per_token
    head = 4 * shape.rows * shape.feature_dim  # features, adapted features, logits, grads
    state = 6 * shape.trainable
    return int((text + head + state) * shape.dtype_bytes)


def pick_parallel_clients(budget_mb: float, per_client_bytes: int, clients: int) -> int:
    """K for a memory budget: as many clients as fit, at least 1, at most ``clients``."""
    if per_client_bytes <= 0:
        raise ValueError(f"per-client bytes must be > 0 (got {per_client_bytes}).")
    fits = int(budget_mb * MB // per_client_bytes)
    return max(1, min(clients, fits))


def check_parallel_settings(parallel_clients: ParallelClients, parallel_memory_mb) -> None:
    """Refuse bad ``trainer.parallel_clients`` / ``trainer.parallel_memory_mb``, naming the
    field and the fix."""
    if parallel_clients != "auto" and (
        isinstance(parallel_clients, bool)
        or not isinstance(parallel_clients, int)
        or parallel_clients < 1
    ):
        raise ValueError(
            f"trainer.parallel_clients must be an integer >= 1 or auto (got "
            f"{parallel_clients!r}); 1 trains the clients one after another."
        )
    if parallel_memory_mb is None:
        return
    check_finite({"trainer.parallel_memory_mb": parallel_memory_mb})
    if isinstance(parallel_memory_mb, bool) or not parallel_memory_mb > 0:
        raise ValueError(
            f"trainer.parallel_memory_mb must be > 0 or null (got {parallel_memory_mb!r})."
        )
    if parallel_clients != "auto":
        raise ValueError(
            f"trainer.parallel_memory_mb={parallel_memory_mb} only sizes "
            "trainer.parallel_clients=auto; set parallel_clients auto or drop the budget."
        )
