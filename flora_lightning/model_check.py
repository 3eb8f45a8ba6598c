"""Check a method's own settings (``model.init_args``) before torch and friends are imported.

Part of the early config check (:mod:`flora_lightning.config_check`), run under
:func:`~flora_lightning.config_check.heavy_imports_refused`, so it imports nothing heavy.
:func:`check_model` gathers the method's class path and ``init_args`` the way jsonargparse
merges them (config files, ``--model VALUE``, ``--model.KEY=VALUE`` overrides:
:func:`model_settings`), reads the method's signature from its source
(:mod:`flora_lightning.source_signature`) and parses the settings with it, so a misspelt key, a
wrong type or a settings class's own check (``model.lora.rank must be >= 1``) is reported in
the full parser's words. A form of the settings whose merging it does not repeat, another
package's class, or a setting whose type is not read from source is left to the full parser.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from flora_lightning.error_report import ConfigError
from flora_lightning.source_signature import PACKAGE, Resolver, source_signature, subclass_names

METHOD_BASE = "FederatedCLIPModule"
"""The base class every method (a ``model`` class) subclasses."""
DEFAULT_METHOD = "flora_lightning.methods.FLoRA"
"""The method a config gets when it names none."""


def defined_names(module: str) -> set[str]:
    """What ``module`` defines or exports (a lazy package's names too), without importing more
    than imports light."""
    try:
        return set(dir(importlib.import_module(module)))
    except ImportError:
        source = Resolver().source(module)
        return set(source.imports) | set(source.classes) | set(source.assigned)


def _option_value(args: list[str], i: int) -> tuple[str, str | None, int]:
    """(option, value, index of the next argument) for ``args[i]`` (``--o v`` or ``--o=v``)."""
    option, has_value, value = args[i].partition("=")
    if has_value:
        return option, value, i + 1
    return option, (args[i + 1] if i + 1 < len(args) else None), i + 2


def _yaml_value(value: str | None) -> Any:
    """A ``--model`` value as jsonargparse reads it: a YAML file, a YAML mapping, or a name."""
    if value is not None and Path(value).is_file():
        return yaml.safe_load(Path(value).read_text())
    if value is not None and value.lstrip().startswith("{"):
        return yaml.safe_load(value)
    return value


def model_settings(args: list[str]) -> tuple[str, dict, list[str]] | None:
    """The method's class path, its ``init_args`` from the config files and ``--model VALUE``
    (merged in order), and its ``--model.KEY=VALUE`` overrides as ``--KEY=VALUE``.

    None when they take a form whose merging this check does not repeat (a config file after
    an override, a class change after one, extra keys): the full parser then judges.
    """
    class_path, init_args, overrides = DEFAULT_METHOD, {}, []
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            i += 1
            continue
        option, value, i = _option_value(args, i)
        if option == "--config":
            if value is None or not Path(value).is_file():
                return None
            content = yaml.safe_load(Path(value).read_text())
            piece = content.get("model") if isinstance(content, dict) else None
        elif option == "--model":
            piece = _yaml_value(value)
        elif option == "--model.class_path":
            piece = value
        elif option.startswith("--model."):
            key = option.removeprefix("--model.").removeprefix("init_args.")
            overrides.append(f"--{key}={value}")
            continue
        else:
            continue
        if piece is None:
            continue
        if overrides:
            return None
        if isinstance(piece, str):
            piece = {"class_path": piece}
        if not isinstance(piece, dict) or set(piece) - {"class_path", "init_args"}:
            return None
        if piece.get("class_path", class_path) != class_path:
            class_path = piece["class_path"]
            # as jsonargparse: keep the settings the new class also takes
            accepted = _method_signature(class_path)
            if accepted is None:
                return None
            params = inspect.signature(accepted.function).parameters
            init_args = {k: v for k, v in init_args.items() if k in params}
        _deep_merge(init_args, piece.get("init_args") or {})
    return class_path, init_args, overrides


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _method_signature(class_path: str):
    """The stand-in signature of one of this package's methods, or None (another package's
    class, an unknown one, or one whose signature is not read from source)."""
    name = class_path.rpartition(".")[2]
    known = subclass_names(METHOD_BASE)
    if name not in known or class_path not in (name, known[name], f"{PACKAGE}.methods.{name}"):
        return None
    try:
        return source_signature(*known[name].rsplit(".", 1))
    except LookupError:
        return None


def check_model(args: list[str]) -> None:
    """The method's own settings (``model.init_args``: ``lora``, ``optimizer``, ...), checked as
    the full parser does, with the method's signature read from its source.

    Raises:
        ConfigError: in the full parser's words (``Parser key "model": Problem with given
            class_path ...``).
        ValueError: a settings class's own check (``model.lora.rank must be >= 1``).
    """
    settings = model_settings(args)
    if settings is None:
        return
    class_path, init_args, overrides = settings
    signature = _method_signature(class_path)
    if signature is None:
        return
    name = class_path.rpartition(".")[2]
    if any(key.split(".")[0] in signature.opaque for key in init_args) or any(
        o[2:].split("=")[0].split(".")[0] in signature.opaque for o in overrides
    ):
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(signature.function)
    shown = f"{PACKAGE}.methods.{name}"
    if name not in defined_names(f"{PACKAGE}.methods"):
        shown = subclass_names(METHOD_BASE)[name]
    try:
        config = parser.parse_object(init_args)
        config = parser.parse_args(overrides, namespace=config)
        parser.instantiate_classes(config)
    except argparse.ArgumentError as err:
        inner = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigError(
            f'Parser key "model": Problem with given class_path {shown!r}: {inner}'
        ) from err
