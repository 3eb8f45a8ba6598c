"""K clients' LoRA adapters in one forward of the shared text tower (grouped LoRA).

``trainer.parallel_clients`` trains K FLoRA clients whose adapters differ while everything else
in CLIP is frozen and shared. Instead of vmapping the whole text tower over the clients (every
op then goes through functorch's batching rules: at the tiny CLIP that overhead is most of the
step), the tower runs once, as ordinary autograd, on the K clients' captions stacked along the
batch (``[K * U, T]``: client k's U captions are rows ``k*U .. k*U+U-1``). Inside
:func:`grouped_lora` each peft LoRA linear computes, for client k's rows ``x_k``::

    base(x) + scaling * (x_k @ A_k^T) @ B_k^T          (A_k [r, in], B_k [out, r]: batched matmuls)

which is peft's vanilla ``Linear.forward`` (``result + lora_B(lora_A(x)) * scaling``, dropout
0) written for a client dimension: the frozen matmul runs once on all K clients' rows, the
low-rank paths per client. Attention, layer norms and MLPs see a K-times larger batch of
independent sequences, so the fused attention kernel is kept. The clients' losses are
independent, so the gradient of their sum with respect to ``A_k``/``B_k`` is client k's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from flora_lightning.clip.features import text_features


def _weight_name(module_name: str, part: str, adapter: str) -> str:
    return f"{module_name}.{part}.{adapter}.weight"


def _grouped_forward(module, paths, groups: int, x: torch.Tensor, *args, **kwargs):
    """``module``'s forward with client k's low-rank paths on the k-th group of input rows."""
    result = module.base_layer(x, *args, **kwargs)
    rows = x.reshape(groups, -1, x.shape[-1])  # [K, rows per client, in]
    for a, b, scaling in paths:
        # A shared by every client (lora.freeze_a) is [r, in]; a client's own is [K, r, in]
        low = F.linear(rows, a) if a.dim() == 2 else torch.bmm(rows, a.transpose(1, 2))
        delta = F.linear(low, b) if b.dim() == 2 else torch.bmm(low, b.transpose(1, 2))
        result = result + (delta * scaling).reshape(result.shape)
    return result


def lora_linears(model) -> dict[str, LoraLinear]:
    """The peft LoRA linears of ``model`` (full module name -> module)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@contextmanager
def grouped_lora(
    linears: Mapping[str, LoraLinear], weights: Mapping[str, torch.Tensor], groups: int
) -> Iterator[None]:
    """While inside, every active LoRA linear of ``linears`` (:func:`lora_linears` of the
    model, found once per fit rather than each step) runs :func:`_grouped_forward` with the
    stacked ``weights`` (parameter name -> ``[K, ...]``; names absent use the module's own
    weight, shared by every client); restored after.

    Raises:
        ValueError: a LoRA linear the grouped forward does not reproduce (merged, disabled,
            a variant such as DoRA, dropout), or a stacked weight that is not a LoRA weight.
    """
    covered: set[str] = set()
    patched = []
    try:
        for name, module in linears.items():
            paths = []
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                dropout = module.lora_dropout[adapter]
                if (
                    module.merged
                    or module.disable_adapters
                    or adapter in getattr(module, "lora_variant", {})
                    or not isinstance(dropout, torch.nn.Identity)
                ):
                    raise ValueError(
                        f"grouped LoRA: {name} is merged, disabled, a LoRA variant or has "
                        "dropout; only vanilla LoRA trains clients side by side."
                    )
                a_name = _weight_name(name, "lora_A", adapter)
                b_name = _weight_name(name, "lora_B", adapter)
                a = weights.get(a_name, module.lora_A[adapter].weight)
                b = weights.get(b_name, module.lora_B[adapter].weight)
                covered.update(n for n in (a_name, b_name) if n in weights)
                paths.append((a, b, module.scaling[adapter]))
            module.forward = partial(_grouped_forward, module, paths, groups)
            patched.append(module)
        stray = set(weights) - covered
        if stray:
            raise ValueError(f"grouped LoRA: {sorted(stray)} are not active LoRA weights.")
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute: the class's forward again


def grouped_caption_features(
    model,
    linears: Mapping[str, LoraLinear],
    weights: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """Normalised caption features ``[K, U, D]`` of the classes ``labels`` (``[U]``) for each of
    the K clients, client k with its LoRA weights ``weights[name][k]`` (names as in
    ``model.named_parameters()``; ``linears``: :func:`lora_linears` of ``model``), in one
    forward of the shared text tower."""
    ids = model.caption_ids[labels].repeat(groups, 1)
    mask = model.caption_mask[labels].repeat(groups, 1)
    with grouped_lora(linears, weights, groups):
        feats = text_features(model.clip, ids, mask)
    return F.normalize(feats, dim=-1).reshape(groups, len(labels), -1)
