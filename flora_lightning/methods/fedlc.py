"""FedLC: a federated linear classifier on frozen CLIP image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig


class FedLC(FederatedCLIPModule):
    """Linear head on frozen, L2-normalised CLIP image features, initialised zero-shot.

    With :math:`\\hat f(x)` the normalised projected image feature and :math:`s = e^{\\tau}`
    CLIP's (frozen) logit scale, the logits are

    .. math::

        z(x) = s \\, (W \\hat f(x) + b), \\qquad W \\in \\mathbb{R}^{C \\times d},\\
        b \\in \\mathbb{R}^C,

    trained with cross-entropy :math:`\\mathrm{CE}(z(x), y)`. The head starts as the zero-shot
    classifier: :math:`W_0 = [\\hat g(t_1), \\dots, \\hat g(t_C)]^\\top` (normalised class caption
    features) and :math:`b_0 = 0`, so before training :math:`z(x)` *is* CLIP's zero-shot logits:
    round-0 accuracy and loss are exactly zero-shot. Only ``head`` (``nn.Linear(d, C)``) trains
    and travels: :math:`(d + 1) C` parameters, 513 C at ViT-B/32 (:math:`d` = 512).

    Why :math:`s` multiplies the head instead of being folded into :math:`W_0`: with the paper's
    coupled weight decay (0.2), a head whose entries are ~100x larger is dominated by the decay
    term and Adam only shrinks it (measured on the offline digits: no accuracy change at all).
    With unit-norm rows the decay is as mild as for any other CLIP weight.

    The head is built in :meth:`configure_task`, once the classes are known.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
    """

    method_name = "FedLC"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)
        self.head: torch.nn.Linear | None = None
        self._head_task: tuple | None = None

    def setup_trainable(self) -> None:
        """CLIP stays frozen; the head is created in :meth:`configure_task`."""

    @property
    def image_encoder_frozen(self) -> bool:
        return True

    def configure_task(self, class_names: list[str], template: str) -> None:
        """Tokenise the captions, then build the head from their zero-shot text features.

        Called again with the same classes and template (``validate`` after ``fit``), the
        trained head is kept.
        """
        super().configure_task(class_names, template)
        task = (tuple(class_names), template)
        if self.head is not None and self._head_task == task:
            return
        with torch.no_grad():
            weight = self.class_text_features()
            head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
            head.weight.copy_(weight)
            head.bias.zero_()
        self.head = head.to(self.caption_ids.device)
        self._head_task = task

    def head_logits(
        self, features: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``s (W f + b)`` for normalised image features ``f`` (``weight`` defaults to ``W``)."""
        if self.head is None:
            raise RuntimeError(
                f"{type(self).__name__}.configure_task(class_names, template) must run before "
                "training or evaluation: it builds the classification head."
            )
        weight = self.head.weight if weight is None else weight
        return self.logit_scale() * F.linear(features, weight, self.head.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head_logits(self.encode_images(pixel_values)), labels)

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """The head's weight ``W``: one class vector per row (the caption features at round 0)."""
        return self.head.weight.detach()

    @torch.no_grad()
    def evaluate_batch(self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor):
        """Head logits ``s (W f + b)`` with ``W`` = ``class_embeddings``."""
        return self.head_logits(self.encode_images(pixel_values), class_embeddings)
