"""``flora``: LightningCLI-style command line (jsonargparse) for fit / validate / test.

Conventions as LightningCLI: ``flora fit --config cfg.yaml``, ``--print_config``, dotted
overrides (``--model.lora.rank 8``, ``--data.partition.beta 1.0``, ``--trainer.rounds 3``),
and ``--model FedFFT`` to pick a method by class name. Every knob comes from a typed signature
with a one-line docstring, which is what ``flora fit --help`` prints.
"""

from __future__ import annotations

import logging
import sys

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.loop import FederatedLoop
from flora_lightning.methods.base import FederatedCLIPModule

STAGES = {
    "fit": "Train: federated rounds, per-round evaluation, checkpoints and summary.json.",
    "validate": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
    "test": "Evaluate the global model (optionally from --ckpt_path) on the global test set.",
}


def stage_parser(stage: str) -> ArgumentParser:
    """The parser of one subcommand: model, data and trainer groups plus --config."""
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
    if stage != "fit":
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Global-state .safetensors checkpoint to evaluate.",
        )
    return parser


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="flora", description=__doc__.splitlines()[0])
    subcommands = parser.add_subcommands(dest="subcommand")
    for stage, help_text in STAGES.items():
        subcommands.add_subcommand(stage, stage_parser(stage), help=help_text)
    from flora_lightning.bench import bench_parser

    subcommands.add_subcommand(
        "bench", bench_parser(), help="Time, memory and bytes of each method vs FedFFT."
    )
    return parser


def run(args: list[str] | None = None) -> dict:
    """Parse ``args`` (default: ``sys.argv``), build everything, run the stage."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(args)
    stage = config.subcommand
    if stage == "bench":
        from flora_lightning.bench import config_from, run_bench

        return run_bench(config_from(config.bench)[0])
    init = parser.instantiate_classes(config)[stage]
    loop: FederatedLoop = init.trainer
    if stage == "fit":
        return loop.fit(init.model, init.data, config_yaml=_dump_config(parser, config))
    return getattr(loop, stage)(init.model, init.data, ckpt_path=init.ckpt_path)


def _dump_config(parser: ArgumentParser, config: Namespace) -> str:
    """The resolved config as YAML, re-runnable with ``flora fit --config run_dir/config.yaml``."""
    stage_config = config[config.subcommand].clone()
    stage_config.pop("config", None)
    sub = parser._subcommands_action._name_parser_map[config.subcommand]
    return sub.dump(stage_config, skip_none=False)


def main() -> None:
    try:
        run()
    except (ValueError, FileExistsError, RuntimeError, KeyError) as err:
        print(f"flora: error: {err}", file=sys.stderr)
        sys.exit(2)
