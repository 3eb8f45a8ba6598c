"""FedLC: a federated linear classifier on frozen CLIP image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig, fp32


class FedLC(FederatedCLIPModule):
    """Linear head on frozen, L2-normalised CLIP image features, initialised zero-shot.

    With :math:`\\hat f(x)` the normalised projected image feature, the logits are, as the
    released head ``fc(x / |x|)``,

    .. math::

        z(x) = W \\hat f(x) + b, \\qquad W \\in \\mathbb{R}^{C \\times d},\\
        b \\in \\mathbb{R}^C,

    trained with cross-entropy :math:`\\mathrm{CE}(z(x), y)`. The head starts as the zero-shot
    classifier: :math:`W_0 = [\\hat g(t_1), \\dots, \\hat g(t_C)]^\\top` (normalised class caption
    features) and :math:`b_0 = 0`, so round-0 accuracy is exactly zero-shot. Only ``head``
    (``nn.Linear(d, C)``) trains and travels: :math:`(d + 1) C` parameters, 513 C at ViT-B/32
    (:math:`d` = 512).

    With ``scale_logits`` the logits are :math:`s \\, (W \\hat f(x) + b)`, :math:`s = e^{\\tau}`
    CLIP's frozen logit scale (100): then round 0 is zero-shot in loss too, and the head learns
    about 100x faster at the same learning rate. Not the released baseline, hence off by default.
    :math:`s` multiplies the head rather than being folded into :math:`W_0` because with the
    paper's coupled weight decay (0.2) a head with ~100x larger entries is dominated by the
    decay term and Adam only shrinks it.

    The head is built in :meth:`configure_task`, once the classes are known.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
        scale_logits: multiply the head's logits by CLIP's logit scale (the released code
            does not).
    """

    method_name = "FedLC"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
        scale_logits: bool = False,
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)
        self.scale_logits = scale_logits
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
        """``W f + b`` (times ``s`` with ``scale_logits``) for normalised image features ``f``
        (``weight`` defaults to ``W``)."""
        if self.head is None:
            raise RuntimeError(
                f"{type(self).__name__}.configure_task(class_names, template) must run before "
                "training or evaluation: it builds the classification head."
            )
        weight = self.head.weight if weight is None else weight
        logits = F.linear(features, weight, self.head.bias)
        return self.logit_scale() * logits if self.scale_logits else logits

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head_logits(self.encode_images(pixel_values)), labels)

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """The head's weight ``W``: one class vector per row (the caption features at round 0)."""
        return self.head.weight.detach()

    @torch.no_grad()
    def evaluate_batch(self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor):
        """Head logits with ``W`` = ``class_embeddings``, computed in fp32 (autocast off)."""
        images = self.encode_images(pixel_values)
        with fp32(images):
            return self.head_logits(images.float(), class_embeddings.float()).float()
