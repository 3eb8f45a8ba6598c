"""``flora``: LightningCLI-style command line (jsonargparse) for fit / validate / test.

Conventions as LightningCLI: ``flora fit --config cfg.yaml``, ``--print_config``, dotted
overrides (``--model.lora.rank 8``, ``--data.partition.beta 1.0``, ``--trainer.rounds 3``),
and ``--model FedFFT`` to pick a method by class name. Every knob comes from a typed signature
with a one-line docstring, which is what ``flora fit --help`` prints.

Errors: one line ``flora: error: ...`` with exit code 2 (the command or config is wrong) or 1
(the run failed: disk, damaged file, out of memory, a bug); ``--debug`` (anywhere on the command
line) or ``FLORA_DEBUG=1`` also prints the traceback. See :mod:`flora_lightning.error_report`.
Config errors are reported before torch, Lightning, transformers, peft, datasets, Flower and
Opacus are imported (:func:`precheck`): a missing ``--config`` file, a YAML syntax error, a run
directory that is a file, and (:mod:`flora_lightning.config_check`) unknown fields, wrong types,
invalid choices, out-of-range values, unknown classes and missing files.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from jsonargparse import ArgumentParser, set_parsing_settings

from flora_lightning.config_check import check_stage_args
from flora_lightning.error_report import ConfigError, classify
from flora_lightning.stages import STAGES, check_run_dir, run_stage, stage_parser

__all__ = ["build_parser", "main", "precheck", "run", "stage_parser"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FLORA_DEBUG"


def build_parser(exit_on_error: bool = True) -> ArgumentParser:
    """The ``flora`` parser with its subcommands.

    Args:
        exit_on_error: print usage and exit on a parse error (argparse's way); False raises
            ``argparse.ArgumentError`` instead, which :func:`main` reports as one line.
    """
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="flora", description=__doc__.splitlines()[0], exit_on_error=exit_on_error
    )
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


def _option_values(args: list[str], option: str) -> list[tuple[int, str]]:
    """(position, value) of every ``option VALUE`` / ``option=VALUE`` in ``args``."""
    found = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            found.append((i, args[i + 1]))
        elif arg.startswith(option + "="):
            found.append((i, arg.split("=", 1)[1]))
    return found


def _check_config_file(value: str) -> dict | None:
    """A ``--config`` file: exists, reads, parses as YAML. Returns its content (None if it is
    not a file path or not a mapping)."""
    import yaml

    path = Path(value)
    looks_like_file = path.suffix.lower() in (".yaml", ".yml", ".json")
    if not path.exists():
        if looks_like_file:
            raise ConfigError(f"--config {value}: no such file (relative to {Path.cwd()}).")
        return None  # perhaps an inline YAML string: jsonargparse decides
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config {value}: cannot be read ({err.strerror or err}).") from err
    try:
        content = yaml.safe_load(text)
    except (yaml.scanner.ScannerError, yaml.parser.ParserError) as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(
            f"--config {value}: YAML syntax error at {where}: {err.problem}{context}; fix the "
            "file (indentation, a missing ':' or closing bracket)."
        ) from err
    except yaml.YAMLError:
        return None  # not a syntax error: jsonargparse's loader reports it
    return content if isinstance(content, dict) else None


def precheck(args: list[str]) -> None:
    """Errors found without the heavy imports, for the fit / validate / test stages.

    Every ``--config`` file must exist and be valid YAML, ``trainer.default_root_dir`` (the
    last one given, by a config file or an override) must not be a file, and the config must
    pass :func:`~flora_lightning.config_check.check_stage_args`.

    Raises:
        ConfigError: naming the file and line, or the field.
        ValueError: a config class's own check, naming the field.
    """
    stage = next((arg for arg in args if not arg.startswith("-")), None)
    if stage not in STAGES:
        return
    rest = args[args.index(stage) + 1 :]
    settings = []  # (position, default_root_dir), in command-line order
    for position, value in _option_values(rest, "--config"):
        content = _check_config_file(value)
        trainer = (content or {}).get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("default_root_dir"), str):
            settings.append((position, trainer["default_root_dir"]))
    settings += _option_values(rest, "--trainer.default_root_dir")
    printing = any(arg == "--print_config" or arg.startswith("--print_config=") for arg in rest)
    if settings and not printing:  # --print_config only prints: no run directory is used
        check_run_dir(max(settings)[1])
    check_stage_args(args)


def run(args: list[str] | None = None) -> dict:
    """Parse ``args`` (default: ``sys.argv``), build everything, run the stage."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if args is None else args)
    precheck(args)
    parser = build_parser(exit_on_error=False)
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
    """``flora``: run, and report a failure as one line (plus the traceback with --debug)."""
    args = sys.argv[1:]
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    try:
        run(args)
    except KeyboardInterrupt:
        print(
            "flora: interrupted; files written so far are complete (`--trainer.resume true` "
            "continues a fit run from its last resume state).",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as err:
        report = classify(err)
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"flora: error: {report.message}", file=sys.stderr)
        sys.exit(report.exit_code)
