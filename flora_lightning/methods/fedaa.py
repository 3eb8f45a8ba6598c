"""FedAA: FedCLIP's attention adapter on frozen CLIP image features."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from flora_lightning.clip.backbone import image_features
from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig


class AttentionAdapter(torch.nn.Sequential):
    """``Linear(d, d) - Tanh - Linear(d, d) - Softmax``: a per-dimension attention over ``f``.

    Args:
        dim: feature dimension ``d``.
        init: ``identity`` (the released ``_make_attention_adapter``: both weights the identity,
            both biases zero) or ``torch`` (PyTorch's default Linear init).
    """

    def __init__(self, dim: int, init: Literal["identity", "torch"] = "identity") -> None:
        super().__init__(
            torch.nn.Linear(dim, dim),
            torch.nn.Tanh(),
            torch.nn.Linear(dim, dim),
            torch.nn.Softmax(dim=-1),
        )
        if init == "identity":
            with torch.no_grad():
                for linear in (self[0], self[2]):
                    torch.nn.init.eye_(linear.weight)
                    torch.nn.init.zeros_(linear.bias)


class FedAA(FederatedCLIPModule):
    """FedCLIP's attention adapter (Lu et al., 2023): only the adapter trains and travels.

    With :math:`f(x)` the frozen projected image feature, the adapted feature is

    .. math::

        a(x) = \\mathrm{softmax}\\big(W_2 \\tanh(W_1 f(x) + b_1) + b_2\\big), \\qquad
        \\tilde f(x) = \\frac{a(x) \\odot f(x)}{\\lVert a(x) \\odot f(x) \\rVert},

    trained with CLIP's symmetric contrastive loss against the frozen class caption features
    :math:`\\hat g(t_y)`, which are computed once per task (no gradient, no text forward per
    step). Evaluation is zero-shot style with those features. Communicated:
    :math:`2 (d^2 + d)` parameters, 525,312 at ViT-B/32 (:math:`d` = ``projection_dim`` = 512).

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
        adapter_init: ``identity`` (the released code: identity weights, zero biases) or
            ``torch`` (PyTorch's default Linear init).
    """

    method_name = "FedAA"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
        adapter_init: Literal["identity", "torch"] = "identity",
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)
        if adapter_init not in ("identity", "torch"):
            raise ValueError(
                f"model.adapter_init must be identity or torch (got {adapter_init!r})."
            )
        self.adapter_init = adapter_init
        self.adapter: AttentionAdapter | None = None
        self.register_buffer("text_cache", torch.zeros(0, 0), persistent=False)

    def setup_trainable(self) -> None:
        self.adapter = AttentionAdapter(self.clip.config.projection_dim, self.adapter_init)

    @property
    def image_encoder_frozen(self) -> bool:
        return True

    def configure_task(self, class_names: list[str], template: str) -> None:
        """Tokenise the captions and encode them once with the frozen text tower."""
        super().configure_task(class_names, template)
        with torch.no_grad():
            self.text_cache = super().class_text_features()

    def class_text_features(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Cached normalised caption features for ``labels`` (all classes when ``None``)."""
        if self.text_cache.numel() == 0:
            raise RuntimeError(
                "FedAA.configure_task(class_names, template) must run before training or "
                "evaluation: it encodes the class captions."
            )
        return self.text_cache if labels is None else self.text_cache[labels]

    cached_features_kind = "FedAA.frozen_image_features"  # the key disk caches already use

    def frozen_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected CLIP image features :math:`f(x)`, what the adapter reads.

        Feature caching stores these (not the normalised ones), so the cached and uncached
        paths give the same :math:`a(x)`: the adapter is not scale invariant.
        """
        return image_features(self.clip_model(), self.prepare_images(pixel_values))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """:math:`\\tilde f(x)` from pixels ``[B, 3, H, W]`` or cached features ``[B, d]``."""
        feats = self.image_inputs_to_features(images)
        return F.normalize(self.adapter(feats) * feats, dim=-1)
