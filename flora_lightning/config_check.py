"""Check a ``fit`` / ``validate`` / ``test`` config before torch and friends are imported.

Importing torch, Lightning, transformers, peft and datasets takes seconds; a typo in a config
should not. :func:`check_stage_args` parses the command line with a parser of the same shape as
:func:`flora_lightning.stages.stage_parser`, built from the same signatures read from the
source (:mod:`flora_lightning.source_signature`) and the torch-free config classes
(``PartitionConfig``, ``Availability``, ``PrivacyConfig``, ``RankTier``), then runs their
checks and :func:`~flora_lightning.federation.settings.check_settings`. Unknown fields, wrong
types, invalid choices, out-of-range values, unknown classes and missing files are reported
from here, in the words of the full parser (plus a "did you mean").
A method's own settings (``model.init_args``) are checked by :mod:`flora_lightning.model_check`.

It runs with :data:`HEAVY` libraries refused (:class:`HeavyImportRefusal`). What it cannot
judge without them (a strategy's or method's own settings, a user's class) it leaves to the
full parser: it reports an error only when the error cannot depend on what was not imported.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.abc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from flora_lightning.error_report import ConfigError
from flora_lightning.model_check import DEFAULT_METHOD, METHOD_BASE, check_model, defined_names
from flora_lightning.source_signature import (
    PACKAGE,
    Resolver,
    module_file,
    source_signature,
    subclass_names,
)

HEAVY = (
    "torch",
    "torchvision",
    "torchmetrics",
    "transformers",
    "peft",
    "datasets",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "flwr",
    "flwr_datasets",
    "opacus",
)
"""Libraries (top-level names) not imported before the config is checked."""

STAGE_HELP = {
    "fit": "Train.",
    "validate": "Evaluate.",
    "test": "Evaluate.",
}
GROUPS = {
    # group: (module, class) whose __init__ is the group's fields, as in stages.stage_parser
    "data": ("flora_lightning.data.datamodule", "FederatedDataModule"),
    "trainer": ("flora_lightning.federation.loop", "FederatedLoop"),
}
SUBCLASS_FIELDS = {
    # field: (base class name, default class path, what one is called)
    "model": (METHOD_BASE, DEFAULT_METHOD, "method"),
    "trainer.strategy": ("Strategy", None, "strategy"),
}
SKIP_FLAGS = ("-h", "--help", "--print_config")


class HeavyImportRefusal(importlib.abc.MetaPathFinder):
    """Refuses to import :data:`HEAVY` libraries (not already imported) and records each try."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            self.refused.append(name)
            raise ModuleNotFoundError(
                f"{name} is not imported while the config is checked", name=name
            )
        return None


@contextmanager
def heavy_imports_refused() -> Iterator[HeavyImportRefusal]:
    """Within the block, importing a :data:`HEAVY` library raises ``ModuleNotFoundError``."""
    refusal = HeavyImportRefusal()
    sys.meta_path.insert(0, refusal)
    try:
        yield refusal
    finally:
        sys.meta_path.remove(refusal)


def early_parser(stage: str) -> tuple[ArgumentParser, ArgumentParser, set[str]]:
    """The ``flora`` parser with only ``stage``, built without the heavy imports, the stage's
    own parser, and its opaque fields (dotted), whose values only the full parser checks."""
    from flora_lightning.privacy.config import PrivacyConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    resolver = Resolver()
    stage_parser = ArgumentParser(exit_on_error=False)
    stage_parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s).")
    # no type: the value as given (a type that allows a class would import its class_path)
    stage_parser.add_argument("--model", default={"class_path": SUBCLASS_FIELDS["model"][1]})
    opaque = {"model"}
    for group, (module, name) in GROUPS.items():
        signature = source_signature(module, name, resolver)
        stage_parser.add_function_arguments(signature.function, group)
        opaque |= {f"{group}.{field}" for field in signature.opaque}
    stage_parser.add_class_arguments(PrivacyConfig, "privacy")
    if stage != "fit":
        stage_parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser = ArgumentParser(prog="flora", exit_on_error=False)
    subcommands = parser.add_subcommands(dest="subcommand")
    subcommands.add_subcommand(stage, stage_parser, help=STAGE_HELP[stage])
    return parser, stage_parser, opaque


def light_args(args: list[str], opaque: set[str]) -> list[str]:
    """``args`` without the options inside an opaque field (``--model.lora.rank 4``), and with
    ``--F.class_path X`` as ``--F X``: the early parser takes an opaque field's value whole."""
    kept, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        option, has_value, value = arg.partition("=")
        inside = next((f for f in opaque if option.startswith(f"--{f}.")), None)
        if inside is None:
            kept.append(arg)
            continue
        if not has_value:
            skip = True
            value = args[i + 1] if i + 1 < len(args) else ""
        if option == f"--{inside}.class_path":
            kept += [f"--{inside}", value]
    return kept


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_option_hint(message: str, stage_parser: ArgumentParser) -> str:
    """A "did you mean" for an unknown option named in jsonargparse's ``message``."""
    known = list(stage_parser.get_defaults().keys())
    for marker in ("unrecognized arguments: --", "does not accept option '"):
        if marker in message:
            word = message.split(marker, 1)[1].split()[0].rstrip("'").split("=")[0]
            hint = _did_you_mean(word, known)
            return hint.replace("did you mean ", "did you mean --") if "--" in marker else hint
    return ""


def _class_path(value: Any) -> str | None:
    if isinstance(value, str) and value.lstrip().startswith("{"):  # --model '{class_path: X}'
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return value["class_path"]
    return None


def check_class_path(field: str, value: Any) -> None:
    """An unknown class of this package for a subclass field (``model``, ``trainer.strategy``).

    Raises:
        ConfigError: naming the field, the closest known class and the choices.
    """
    class_path = _class_path(value)
    base, _, what = SUBCLASS_FIELDS[field]
    if class_path is None or class_path in ("null", "None"):
        return
    known = subclass_names(base)  # {name: dotted path}
    module, _, name = class_path.rpartition(".")
    if not module:
        if name in known:
            return
        guess = _did_you_mean(name, list(known))
    elif module == PACKAGE or module.startswith(PACKAGE + "."):
        path = module_file(module)
        if path is not None:
            defined = defined_names(module)
            if name in defined:
                return
            close = difflib.get_close_matches(name, [n for n in defined if n in known], n=1)
            guess = f"; did you mean {module}.{close[0]}?" if close else ""
        else:
            guess = f" (there is no module {module})"
    else:
        return  # another package's class: the full parser imports and checks it
    choices = ", ".join(sorted(known))
    raise ConfigError(
        f"{field}: unknown {what} class {class_path!r}{guess} Choose one of {choices} (by name "
        f"or full class path), or give the import path of your own {base} subclass."
    )


def check_paths(stage: str, config) -> None:
    """Files a field names that must already exist.

    Raises:
        ConfigError: naming the field, the path and the fix.
    """
    ckpt = config.get("ckpt_path") if stage != "fit" else None
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(
            f"--ckpt_path {ckpt}: no such file (relative to {Path.cwd()}); give a checkpoint "
            "of a fit run (<trainer.default_root_dir>/checkpoints/round_NNN.safetensors), or "
            "leave --ckpt_path out to evaluate the model as the config builds it."
        )
    data = config.data
    if data.dataset == "imagefolder" and data.data_dir and not Path(data.data_dir).is_dir():
        raise ConfigError(
            f"data.data_dir={data.data_dir}: no such folder (relative to {Path.cwd()}); "
            "data.dataset imagefolder reads the images from there (one sub-folder per class)."
        )


def _validate(parser: ArgumentParser, stage: str, config, args: list[str]) -> None:
    """The config classes' own checks, the trainer's checks, class paths and files."""
    from flora_lightning.data.settings import check_data_settings
    from flora_lightning.federation.settings import check_settings

    init = parser.instantiate_classes(config)[stage]  # PartitionConfig, PrivacyConfig, ...
    check_data_settings(**vars(init.data))
    check_settings(**vars(init.trainer))
    check_class_path("model", config[stage].model)
    check_class_path("trainer.strategy", config[stage].trainer.strategy)
    check_paths(stage, config[stage])
    check_model(args)


def check_stage_args(args: list[str]) -> None:
    """Check ``flora STAGE ARGS`` (fit, validate or test) before the heavy imports.

    Returns quietly when the config passes, when ``args`` is not such a stage (or asks for help
    or a printed config), or when judging it needs a heavy import (the full parser then does).

    Raises:
        ConfigError: the first config error found, naming the field and the fix.
        ValueError: a config class's own check (e.g. ``data.partition.beta must be > 0``).
    """
    stage = next((arg for arg in args if not arg.startswith("-")), None)
    if stage not in STAGE_HELP or any(a.split("=")[0] in SKIP_FLAGS for a in args):
        return
    if any(a.split("=")[0].endswith(".help") for a in args):
        return
    with heavy_imports_refused() as refusal:
        parser, stage_parser, opaque = early_parser(stage)
        refusal.refused.clear()  # reading the signatures may try heavy modules: that is fine
        try:
            config = parser.parse_args(light_args(args, opaque))
            _validate(parser, stage, config, args)
        except argparse.ArgumentError as err:
            if refusal.refused:
                return  # the parse needed a heavy module: the full parser decides
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ConfigError(message + _unknown_option_hint(message, stage_parser)) from err
        except ImportError:
            return
