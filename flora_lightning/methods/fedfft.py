"""FedFFT: federated full fine-tuning; every CLIP parameter trains and travels."""

from __future__ import annotations

from flora_lightning.methods.base import FederatedCLIPModule


class FedFFT(FederatedCLIPModule):
    """Full fine-tuning of CLIP with its contrastive loss (the paper's upper-cost baseline).

    Both towers, both projections and ``logit_scale`` train, with the base class's loss: for a
    batch of images :math:`x_i` with class captions :math:`t_i`,

    .. math::

        s_{ij} = e^{\\tau} \\, \\hat f(x_i) \\cdot \\hat g(t_j), \\qquad
        \\mathcal{L} = \\tfrac12 \\big[\\mathrm{CE}(s, I) + \\mathrm{CE}(s^\\top, I)\\big],

    where :math:`\\hat f, \\hat g` are the L2-normalised projected image/text features and
    :math:`\\tau` is ``logit_scale``. The communicated state is the whole ``CLIPModel``:
    151,277,313 parameters at ViT-B/32 (text tower 63,165,952 + vision tower 87,456,000 +
    projections 655,360 + ``logit_scale``). Evaluation is zero-shot style with the fine-tuned
    text tower, as for FLoRA.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
    """

    method_name = "FedFFT"

    def setup_trainable(self) -> None:
        self.clip.requires_grad_(True)

    def train_submodules(self) -> None:
        self.clip.train()
