"""FLoRA: LoRA adapters (peft) on CLIP's text encoder; only the adapters train and travel."""

from __future__ import annotations

import math

import torch

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig
from flora_lightning.methods.settings import (  # noqa: F401  (re-exported: the old import paths)
    ATTENTION,
    MLP,
    PAPER_SCALING,
    LoraSettings,
)


@torch.no_grad()
def paper_init_lora_a_(model: torch.nn.Module) -> None:
    """Redraw every LoRA A as the released code does: ``W_a = randn(in, r) / sqrt(r)``.

    peft stores A as ``lora_A.weight`` of shape ``[r, in]`` (``W_a`` transposed); the values
    are drawn in the released shape, layer by layer in module order, from torch's global
    generator (seeded by ``trainer.seed`` before the model is built).
    """
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for layer in lora_a.values():
            rank, fan_in = layer.weight.shape
            draw = torch.randn(fan_in, rank) / math.sqrt(rank)
            layer.weight.copy_(draw.T.to(layer.weight.dtype))


class FLoRA(FederatedCLIPModule):
    """CLIP with peft LoRA adapters; the adapters are the whole communicated state.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        lora: adapter placement and shape.
        optimizer: local optimizer settings (Adam).
    """

    method_name = "FLoRA"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        lora: LoraSettings = LoraSettings(),
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)
        self.lora = lora

    def setup_trainable(self) -> None:
        from peft import get_peft_model

        # get_peft_model freezes everything but the adapters.
        self.clip = get_peft_model(self.clip, self.lora.peft_config())
        if self.lora.init == "paper":
            paper_init_lora_a_(self.clip)
        if self.lora.freeze_a:
            for name, param in self.clip.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)

    @property
    def image_encoder_frozen(self) -> bool:
        return self.lora.tower == "text"

    def train_submodules(self) -> None:
        for name, module in self.clip.named_modules():
            if "lora_" in name:
                module.train()

    def export(self, folder: str) -> None:
        """peft ``save_pretrained`` format: loads with stock ``PeftModel.from_pretrained``."""
        self.clip.save_pretrained(folder)
