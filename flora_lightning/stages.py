"""The ``fit`` / ``validate`` / ``test`` stages: their parsers and how a parsed stage runs.

Shared by the ``flora`` command line (:mod:`flora_lightning.cli`) and by anything that runs
stages itself (:mod:`flora_lightning.sweep` runs ``fit`` once per cell), so that neither has to
import the other. Every knob comes from a typed signature with a one-line docstring.

The model, data and loop classes (torch, Lightning, transformers: seconds to import) are
imported when a parser is built, not with this module, so ``flora`` can report errors found
before that (a missing config file, a YAML syntax error) at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from flora_lightning.error_report import ConfigError, run_log
from flora_lightning.rundir.lock import RunDirLock

log = logging.getLogger(__name__)

STAGES = {
    "fit": "Train: federated rounds, per-round evaluation, checkpoints and summary.json.",
    "validate": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
    "test": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
}


def stage_parser(stage: str) -> ArgumentParser:
    """The parser of one stage: model, data and trainer groups plus --config."""
    from flora_lightning.data.datamodule import FederatedDataModule
    from flora_lightning.federation.loop import FederatedLoop
    from flora_lightning.methods import METHODS  # noqa: F401  (imports each: --model FedFFT)
    from flora_lightning.methods.base import FederatedCLIPModule
    from flora_lightning.privacy.config import PrivacyConfig

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


def check_run_dir(run_dir: str | Path | None, field: str = "trainer.default_root_dir") -> None:
    """Refuse a run directory that cannot be a folder (it, or a parent, is a file).

    Raises:
        ConfigError: naming ``field``, the file in the way and the fix.
    """
    if not run_dir:
        return
    path = Path(run_dir)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "it is" if folder == path else f"{folder} is"
                raise ConfigError(
                    f"{field}={run_dir} cannot be a run directory: {what} an existing file; "
                    "pass a folder path (created if missing), e.g. "
                    f"--{field} {path.with_name(path.name + '_run')}."
                )
            return


@dataclass
class RunParts:
    """What a parsed stage config builds: the method, the data, the loop and the config dump."""

    model: Any
    """The federated method (``--model``), not set up yet."""
    data: Any
    """The :class:`~flora_lightning.data.datamodule.FederatedDataModule` (``--data``)."""
    loop: Any
    """The :class:`~flora_lightning.federation.loop.FederatedLoop` (``--trainer``), with the
    run's privacy (``--privacy``) in use."""
    config_yaml: str
    """The resolved config as YAML (what ``config.yaml`` of the run directory holds)."""
    ckpt_path: str | None = None
    """``--ckpt_path`` of ``validate``/``test``."""


def build_run(parser: ArgumentParser, config: Namespace) -> RunParts:
    """Instantiate model, data and loop from ``config`` (parsed by ``parser``) and put the
    privacy settings in use: every runtime builds a run's parts here (``flora`` stages, the
    Flower apps), so all of them train the same thing from one config. Nothing is set up yet."""
    init = parser.instantiate_classes(config)
    loop = init.trainer
    loop.use_privacy(init.privacy)
    return RunParts(
        model=init.model,
        data=init.data,
        loop=loop,
        config_yaml=dump_config(parser, config),
        ckpt_path=init.get("ckpt_path"),
    )


def run_stage(stage: str, parser: ArgumentParser, config: Namespace) -> dict:
    """Build model, data and loop from ``config`` (parsed by ``parser``) and run ``stage``.

    The run's log lines, and the traceback of a failure that is not a config error, go to
    ``<trainer.default_root_dir>/flora.log`` (see :func:`flora_lightning.error_report.run_log`).
    """
    run_dir = config.trainer.default_root_dir
    check_run_dir(run_dir)
    with run_log(run_dir, f"flora {stage}"):
        parts = build_run(parser, config)
        if stage == "fit":
            result = parts.loop.fit(parts.model, parts.data, config_yaml=parts.config_yaml)
        else:  # one writer per run directory, as a fit (its recorder takes the lock)
            evaluate = getattr(parts.loop, stage)
            with RunDirLock(run_dir):
                result = evaluate(parts.model, parts.data, ckpt_path=parts.ckpt_path)
        log.info("flora %s finished; outputs in %s.", stage, run_dir)
        return result


def fit(args: list[str]) -> dict:
    """``flora fit ARGS`` in-process; returns the run's summary."""
    parser = stage_parser("fit")
    return run_stage("fit", parser, parser.parse_args(args))


def dump_config(parser: ArgumentParser, config: Namespace) -> str:
    """The resolved config as YAML, re-runnable with ``flora fit --config run_dir/config.yaml``."""
    config = config.clone()
    config.pop("config", None)
    return parser.dump(config, skip_none=False)
