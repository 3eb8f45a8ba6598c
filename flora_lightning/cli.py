"""``flora``: LightningCLI-style command line (jsonargparse) for fit / validate / test.

Conventions as LightningCLI: ``flora fit --config cfg.yaml``, ``--print_config``, dotted
overrides (``--model.lora.rank 8``, ``--data.partition.beta 1.0``, ``--trainer.rounds 3``),
and ``--model FedFFT`` to pick a method by class name. Every knob comes from a typed signature
with a one-line docstring, which is what ``flora fit --help`` prints.
"""

from __future__ import annotations

import logging
import sys

from jsonargparse import ArgumentParser, set_parsing_settings

from flora_lightning.stages import STAGES, run_stage, stage_parser


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="flora", description=__doc__.splitlines()[0])
    subcommands = parser.add_subcommands(dest="subcommand")
    for stage, help_text in STAGES.items():
        subcommands.add_subcommand(stage, stage_parser(stage), help=help_text)
    from flora_lightning.bench.run import bench_parser

    subcommands.add_subcommand(
        "bench", bench_parser(), help="Time, memory and bytes of each method vs FedFFT."
    )
    from flora_lightning.sweep import sweep_parser

    subcommands.add_subcommand(
        "sweep", sweep_parser(), help="Grid of fit runs (datasets x methods x partitions x seeds)."
    )
    return parser


def run(args: list[str] | None = None) -> dict:
    """Parse ``args`` (default: ``sys.argv``), build everything, run the stage."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(args)
    stage = config.subcommand
    if stage == "bench":
        from flora_lightning.bench.run import config_from, run_bench

        return run_bench(config_from(config.bench))
    if stage == "sweep":
        from flora_lightning.sweep import options_from, run_command

        return run_command(options_from(config.sweep))
    return run_stage(stage, stage_parser(stage), config[stage])


def main() -> None:
    try:
        run()
    except (ValueError, FileExistsError, RuntimeError, KeyError) as err:
        print(f"flora: error: {err}", file=sys.stderr)
        sys.exit(2)
