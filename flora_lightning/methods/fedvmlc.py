"""FedVM-LC: the vision transformer and a linear head train; the text tower is frozen."""

from __future__ import annotations

from flora_lightning.methods.fedlc import FedLC


class FedVMLC(FedLC):
    """FedLC's head on top of a fine-tuned vision transformer.

    As :class:`~flora_lightning.methods.fedlc.FedLC`, the logits are
    :math:`z(x) = s \\, (W \\hat f_\\theta(x) + b)`, the head starts as the zero-shot classifier
    (round 0 equals zero-shot) and trains with cross-entropy; here the vision transformer
    :math:`\\theta` (``clip.vision_model``: embeddings, encoder, layer norms) trains too.
    ``visual_projection``, the text tower and ``logit_scale`` stay frozen. Communicated:
    87,456,000 + 513 C parameters at ViT-B/32.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
    """

    method_name = "FedVMLC"

    @property
    def image_encoder_frozen(self) -> bool:
        return False

    def setup_trainable(self) -> None:
        self.clip.vision_model.requires_grad_(True)

    def train_submodules(self) -> None:
        self.clip.vision_model.train()
