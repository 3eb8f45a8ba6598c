"""FLoRA: LoRA adapters (peft) on CLIP's text encoder; only the adapters train and travel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP = ("fc1", "fc2")
_TOWERS = {"text": "text_model", "vision": "vision_model"}
_INITS = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa"}


@dataclass
class LoraSettings:
    """Where LoRA goes and how it is shaped (paper: out_proj of the text tower, r=2, alpha=64)."""

    rank: int = 2
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / rank (paper: 64 at r=2, i.e. scaling 32)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["out_proj"])
    """Projections to adapt in every layer: any of q_proj, k_proj, v_proj, out_proj, fc1, fc2."""
    tower: Literal["text", "vision", "both"] = "text"
    """Which encoder gets adapters."""
    init: Literal["gaussian", "kaiming", "pissa"] = "gaussian"
    """A's init (B starts at zero): gaussian is A ~ N(0, 1/r) as the paper; kaiming is peft's default."""
    freeze_a: bool = False
    """Train and send only B; A keeps its seeded init, the same on every client, so FedAvg of B
    is exactly the mean of the clients' B·A updates (FFA-LoRA). The paper trains both."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1 (got {self.rank}); the paper uses 2.")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0 (got {self.alpha}); the paper uses 64.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1) (got {self.dropout}).")
        unknown = sorted(set(self.targets) - set(ATTENTION + MLP))
        if not self.targets or unknown:
            raise ValueError(
                f"model.lora.targets has unknown or no entries ({unknown or self.targets}); "
                f"choose from {list(ATTENTION + MLP)}."
            )
        if self.tower not in ("text", "vision", "both"):
            raise ValueError(f"model.lora.tower must be text, vision or both (got {self.tower!r}).")
        if self.init not in _INITS:
            raise ValueError(f"model.lora.init must be one of {list(_INITS)} (got {self.init!r}).")

    def target_regex(self) -> str:
        """A full-match regex for peft: the chosen projections in the chosen tower only.

        A bare ``"out_proj"`` list entry would also hit the vision tower (peft matches lists by
        suffix), hence the explicit regex.
        """
        towers = ["text", "vision"] if self.tower == "both" else [self.tower]
        tower = "|".join(_TOWERS[t] for t in towers)
        attn = [t for t in self.targets if t in ATTENTION]
        mlp = [t for t in self.targets if t in MLP]
        parts = []
        if attn:
            parts.append(rf"self_attn\.({'|'.join(attn)})")
        if mlp:
            parts.append(rf"mlp\.({'|'.join(mlp)})")
        return rf"({tower})\.encoder\.layers\.\d+\.({'|'.join(parts)})"

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex(),
            init_lora_weights=_INITS[self.init],
        )


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
