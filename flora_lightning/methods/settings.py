"""The methods' settings, torch-free: ``model.optimizer`` (every method) and ``model.lora``
(FLoRA).

The methods import them from here; ``flora`` checks them before torch, peft and transformers
are imported (:mod:`flora_lightning.config_check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flora_lightning.finite_values import check_finite_fields


@dataclass
class OptimizerConfig:
    """Adam with coupled weight decay, no schedule: the paper's settings for every method."""

    lr: float = 5e-5
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.2
    """L2 weight decay added to the gradient (torch.optim.Adam, coupled, as the paper)."""
    fused: bool | None = None
    """torch's fused Adam: one kernel for all parameters per step, the same update up to float
    rounding. null: fused on CUDA, torch's default implementation on CPU; true: fused
    everywhere (faster on CPU for methods with many parameters, FedFFT); false: never."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: f"model.optimizer.{field}")
        if not self.lr > 0:
            raise ValueError(f"model.optimizer.lr must be > 0 (got {self.lr}); e.g. 5e-5.")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"model.optimizer.betas must be in [0, 1) (got {self.betas}).")
        if not (self.eps > 0 and self.weight_decay >= 0):
            raise ValueError(
                "model.optimizer.eps must be > 0 and model.optimizer.weight_decay >= 0 "
                f"(got eps={self.eps}, weight_decay={self.weight_decay})."
            )


ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP = ("fc1", "fc2")
_TOWERS = {"text": "text_model", "vision": "vision_model"}
# peft's init_lora_weights per lora.init; "paper" lets peft build (B = 0), then redraws A.
_INITS = {"paper": True, "gaussian": "gaussian", "kaiming": True, "pissa": "pissa"}
PAPER_SCALING = 32.0
"""The released layer computes ``x @ A @ B * 32`` whatever the rank."""


@dataclass
class LoraSettings:
    """Where LoRA goes and how it is shaped (paper: out_proj of the text tower, r=2, scaling 32)."""

    rank: int = 2
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha: the update is scaled by alpha / rank (peft). null: scaling 32 at every rank,
    as the released code (alpha = 32 * rank); a number fixes alpha, so the scaling changes
    with the rank (alpha 64 equals the paper only at r=2)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["out_proj"])
    """Projections to adapt in every layer: any of q_proj, k_proj, v_proj, out_proj, fc1, fc2."""
    tower: Literal["text", "vision", "both"] = "text"
    """Which encoder gets adapters."""
    init: Literal["paper", "gaussian", "kaiming", "pissa"] = "paper"
    """A's init (B starts at zero): paper is the released A = randn(in, r) / sqrt(r) (std
    1/sqrt(r)), drawn from the seeded torch generator; gaussian is peft's (std 1/r, not the
    paper's); kaiming is peft's default; pissa is peft's PiSSA."""
    freeze_a: bool = False
    """Train and send only B; A keeps its seeded init, the same on every client, so FedAvg of B
    is exactly the mean of the clients' B·A updates (FFA-LoRA). The paper trains both."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: f"model.lora.{field}")
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1 (got {self.rank}); the paper uses 2.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(
                f"model.lora.alpha must be > 0 or null (got {self.alpha}); null keeps the "
                "paper's scaling 32 at every rank."
            )
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

    @property
    def lora_alpha(self) -> float:
        """peft's ``lora_alpha``: ``alpha``, or ``32 * rank`` (scaling 32) when it is null."""
        return self.alpha if self.alpha is not None else PAPER_SCALING * self.rank

    @property
    def scaling(self) -> float:
        """The factor on the update ``B A x``: ``lora_alpha / rank``."""
        return self.lora_alpha / self.rank

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex(),
            init_lora_weights=_INITS[self.init],
        )
