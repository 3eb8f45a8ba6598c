"""A new strategy and a new method are one module each: defined here, run by ``flora fit``.

Nothing in the package knows these classes; the command line selects them by class path (the
partitioner counterpart is tests/data/test_custom_partitioner.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig
from flora_lightning.rundir.checkpoint import load_state
from flora_lightning.strategy import ClientUpdate, State, Strategy

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


class CoordinateMedian(Strategy):
    """Element-wise median of the accepted client states (robust aggregation)."""

    def start_round(self, global_state: State) -> None:
        self.states: list[State] = []

    def accumulate(self, update: ClientUpdate) -> None:
        self.states.append(update.state)

    def aggregate(self) -> State:
        return {
            name: torch.stack([s[name] for s in self.states]).median(dim=0).values
            for name in self.states[0]
        }


class TextProjectionTuning(FederatedCLIPModule):
    """Only CLIP's text projection trains and travels.

    Args:
        name_or_path: HF hub id or local folder of a CLIPModel, or flora-offline/tiny-clip.
        optimizer: local optimizer settings.
    """

    method_name = "TextProjectionTuning"

    def __init__(
        self,
        name_or_path: str = "openai/clip-vit-base-patch32",
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__(name_or_path=name_or_path, optimizer=optimizer)

    def setup_trainable(self) -> None:
        self.clip.text_projection.requires_grad_(True)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def quickstart_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", QUICKSTART,
        "--data.partition.num_clients", "3",
        "--trainer.rounds", "2",
        "--trainer.max_local_steps", "2",
        "--trainer.progress", "false",
        "--data.max_test_samples", "64",
        "--trainer.default_root_dir", str(run_dir),
        *extra,
    ]  # fmt: skip


def test_a_strategy_defined_outside_the_package_aggregates_a_run(offline_assets, tmp_path):
    from flora_lightning.stages import fit

    run = tmp_path / "run"
    summary = fit(quickstart_args(run, "--trainer.strategy", class_path(CoordinateMedian)))

    assert [r["accepted_clients"] for r in summary["rounds"][1:]] == [[0, 1, 2]] * 2
    assert class_path(CoordinateMedian) in (run / "config.yaml").read_text()
    # Round 2 started from round 1's median; it moved again.
    one = load_state(run / "checkpoints" / "round_001.safetensors")
    two = load_state(run / "checkpoints" / "round_002.safetensors")
    assert any(not torch.equal(one[k], two[k]) for k in one)


def test_a_method_defined_outside_the_package_trains_and_travels(offline_assets, tmp_path):
    from flora_lightning.stages import fit

    run = tmp_path / "run"
    model = ["--model", class_path(TextProjectionTuning)]
    summary = fit(quickstart_args(run, *model, "--model.name_or_path", "flora-offline/tiny-clip"))

    assert summary["method"] == "TextProjectionTuning"
    state = load_state(run / "checkpoints" / "round_002.safetensors")
    assert list(state) == ["clip.text_projection.weight"]
    width = state["clip.text_projection.weight"].numel()
    assert summary["trainable_params"] == width
    assert summary["rounds"][1]["bytes_up"] == 3 * width * 4  # 3 clients, fp32
