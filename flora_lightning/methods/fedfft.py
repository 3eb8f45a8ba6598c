"""FedFFT: federated full fine-tuning; every CLIP parameter trains and travels."""

from __future__ import annotations

import torch

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig


class FedFFT(FederatedCLIPModule):
    """Full fine-tuning of CLIP with its contrastive loss (the paper's upper-cost baseline).

    Both towers and both projections train, with the base class's loss: for a batch of images
    :math:`x_i` with class captions :math:`t_i`,

    .. math::

        s_{ij} = e^{\\tau} \\, \\hat f(x_i) \\cdot \\hat g(t_j), \\qquad
        \\mathcal{L} = \\tfrac12 \\big[\\mathrm{CE}(s, I) + \\mathrm{CE}(s^\\top, I)\\big],

    where :math:`\\hat f, \\hat g` are the L2-normalised projected image/text features and
    :math:`\\tau` is ``logit_scale``. The communicated state is the whole ``CLIPModel``:
    151,277,313 parameters at ViT-B/32 (text tower 63,165,952 + vision tower 87,456,000 +
    projections 655,360 + ``logit_scale``). As the released FFT client, which reads a detached
    ``exp(logit_scale)``, :math:`\tau` is communicated but never trained (no gradient, no
    weight decay) unless ``train_logit_scale``. Evaluation is zero-shot style with the
    fine-tuned text tower, as for FLoRA.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings (Adam; paper: lr 5e-5, weight decay 0.2).
        train_logit_scale: also train ``logit_scale`` (the released code keeps it fixed).
    """

    method_name = "FedFFT"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
        train_logit_scale: bool = False,
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)
        self.train_logit_scale = train_logit_scale

    def setup_trainable(self) -> None:
        self.clip.requires_grad_(True)  # all of it travels, logit_scale included

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        if self.train_logit_scale:
            return self.trainable_parameters()
        return [p for p in self.trainable_parameters() if p is not self.clip.logit_scale]

    def logit_scale(self) -> torch.Tensor:
        scale = self.clip.logit_scale.exp()
        return scale if self.train_logit_scale else scale.detach()

    def train_submodules(self) -> None:
        self.clip.train()
