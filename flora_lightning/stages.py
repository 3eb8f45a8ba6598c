"""The ``fit`` / ``validate`` / ``test`` stages: their parsers and how a parsed stage runs.

Shared by the ``flora`` command line (:mod:`flora_lightning.cli`) and by anything that runs
stages itself (:mod:`flora_lightning.sweep` runs ``fit`` once per cell), so that neither has to
import the other. Every knob comes from a typed signature with a one-line docstring.
"""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.loop import FederatedLoop
from flora_lightning.methods.base import FederatedCLIPModule
from flora_lightning.privacy.config import PrivacyConfig

STAGES = {
    "fit": "Train: federated rounds, per-round evaluation, checkpoints and summary.json.",
    "validate": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
    "test": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
}


def stage_parser(stage: str) -> ArgumentParser:
    """The parser of one stage: model, data and trainer groups plus --config."""
    import flora_lightning.methods  # noqa: F401  (registers the method classes for --model)

    parser = ArgumentParser(description=STAGES[stage], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s).")
    parser.add_subclass_arguments(
        FederatedCLIPModule,
        "model",
        default={"class_path": "flora_lightning.methods.FLoRA"},
        help=(
            "Federated method (FLoRA, FedFFT, FedLC, FedVMLC, FedAA) and its settings; "
            "`flora fit --model.help FLoRA` lists a method's own knobs."
        ),
    )
    parser.add_class_arguments(FederatedDataModule, "data", help="Dataset and client partitions.")
    parser.add_class_arguments(
        FederatedLoop, "trainer", help="Federated loop (rounds, clients, precision, outputs)."
    )
    parser.add_class_arguments(
        PrivacyConfig, "privacy", help="Differential privacy: sample (DP-SGD) or client level."
    )
    if stage != "fit":
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Global-state .safetensors checkpoint to evaluate.",
        )
    return parser


def run_stage(stage: str, parser: ArgumentParser, config: Namespace) -> dict:
    """Build model, data and loop from ``config`` (parsed by ``parser``) and run ``stage``."""
    init = parser.instantiate_classes(config)
    loop: FederatedLoop = init.trainer
    loop.use_privacy(init.privacy)
    if stage == "fit":
        return loop.fit(init.model, init.data, config_yaml=dump_config(parser, config))
    return getattr(loop, stage)(init.model, init.data, ckpt_path=init.ckpt_path)


def fit(args: list[str]) -> dict:
    """``flora fit ARGS`` in-process; returns the run's summary."""
    parser = stage_parser("fit")
    return run_stage("fit", parser, parser.parse_args(args))


def dump_config(parser: ArgumentParser, config: Namespace) -> str:
    """The resolved config as YAML, re-runnable with ``flora fit --config run_dir/config.yaml``."""
    config = config.clone()
    config.pop("config", None)
    return parser.dump(config, skip_none=False)
