"""What a Flower node accepts from the run config the server sends: its operator's policy.

The run config (``flwr run --run-config``) is written by whoever may start a run on the
SuperLink, not by the node's operator. Its ``overrides`` are ``flora fit`` arguments applied
after the YAML on every node, so without a policy they could make a node write anywhere
(``--trainer.client_state_dir``), read any file (``--data.data_dir``, ``--config``), load any
hub model (``--model.name_or_path``), import any installed class (``--trainer.strategy
some.module.Class``) or weaken its privacy (``--privacy.clip_norm``).

A node is *locked* when its ``--node-config`` pins its YAML (``config="/site/flora.yaml"``) or
names the overrides it allows (``allow-overrides="trainer.max_local_steps,privacy.clip_norm"``).
A locked node reads its own YAML (the run config's ``config`` is ignored, logged when it
differs) and refuses every override that :func:`classify` puts under a rule (:data:`RULES`)
unless ``allow-overrides`` names it: the whole key, or a group above it (``privacy`` allows
``privacy.clip_norm``; ``init_args`` segments are ignored when matching). Plain settings such
as ``trainer.max_local_steps`` or ``trainer.local_epochs`` pass. An unlocked node (Flower's
simulation engine, whose virtual nodes have no node config of their operator's, and a
deployment whose operator also runs the server) follows the run config as before and logs a
warning once. Only nodes apply this: the ServerApp's operator launched it, so any override
goes there. The arguments the run config's own keys produce (``num-server-rounds``, ``out-dir``,
``resume``) are not checked: they are the server's (a node writes nothing in the run directory;
its name only keys the node's optimizer-state folder).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shlex
from typing import Any

log = logging.getLogger(__name__)

PINNED_CONFIG = "config"
"""Node-config key: the flora YAML this node reads, whatever the run config's ``config``."""
ALLOW_OVERRIDES = "allow-overrides"
"""Node-config key: the protected overrides this node accepts, comma- or space-separated."""
CLIP_NORM = "clip-norm"
"""Node-config key: this node's own client-side clipping bound (fixed clipping), and the
largest server bound it accepts (adaptive clipping)."""
POLICY_KEYS = (PINNED_CONFIG, ALLOW_OVERRIDES, CLIP_NORM)
"""The node-config keys of this module."""

RULES = {
    "path": "names a file or folder the node reads or writes",
    "model": "chooses the model the node downloads and loads",
    "privacy": "changes the node's privacy settings",
    "class": "chooses or configures a class the node imports",
    "group": "sets a whole config group at once (it holds paths, classes or privacy)",
}
"""Why an override is protected, by rule name."""

PATH_KEYS = frozenset({
    "config",
    "data.dataset",
    "data.test_dataset",
    "data.data_dir",
    "data.data_files",
    "data.partition.client_dirs",
    "data.partition.client_test_dirs",
    "trainer.client_state_dir",
    "trainer.feature_cache_dir",
    "trainer.default_root_dir",
})  # fmt: skip
"""Arguments of ``flora fit`` that name a file or folder (also any key ending in ``_dir``,
``_dirs``, ``_path``, ``_file``, ``_files``; a test checks this list against the parser)."""
CLASS_KEYS = frozenset({
    "model",
    "trainer.strategy",
    "trainer.callbacks",
    "trainer.availability",
    "trainer.attack",
})  # fmt: skip
"""Arguments of ``flora fit`` whose value is a class (``class_path``/``init_args``): a name
there imports a module (a test checks this list against the parser)."""
_PATH_SUFFIXES = ("_dir", "_dirs", "_path", "_file", "_files")
_warned: set[str] = set()


class OverrideRefused(ValueError):
    """A run-config override the node's operator did not allow."""


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``--key value...`` of the run config's ``overrides``."""

    key: str
    """The dotted key as given (``trainer.max_local_steps``)."""
    values: tuple[str, ...]
    """The value tokens that follow it (or the part after ``=``)."""

    def text(self) -> str:
        return " ".join(("--" + self.key, *map(shlex.quote, self.values)))


def parse_overrides(overrides: str) -> list[Override]:
    """Split a run config's ``overrides`` into its ``--key value...`` items.

    Raises:
        OverrideRefused: a value without a key before it (the node cannot tell what it sets).
    """
    items: list[Override] = []
    for token in shlex.split(overrides):
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            items.append(Override(key.rstrip("+"), (value,) if sep else ()))
        elif items:
            last = items[-1]
            items[-1] = Override(last.key, (*last.values, token))
        else:
            raise OverrideRefused(
                f"run-config overrides={overrides!r}: {token!r} is not a --key argument; a node "
                "checks each override by its key (write them as '--group.field value')."
            )
    return items


def _match_form(key: str) -> str:
    """``key`` without ``init_args``/``class_path`` segments (``trainer.strategy.init_args.mu``
    and ``trainer.strategy.mu`` are one setting)."""
    return ".".join(p for p in key.split(".") if p not in ("init_args", "dict_kwargs"))


def classify(item: Override) -> str | None:
    """The rule (a key of :data:`RULES`) that protects ``item``, or None (a plain setting)."""
    key = _match_form(item.key)
    parts = key.split(".")
    if parts[-1].endswith("name_or_path"):  # a hub id or a local folder: the model's rule
        return "model"
    if key in PATH_KEYS or parts[-1].endswith(_PATH_SUFFIXES):
        return "path"
    if parts[0] == "privacy" and len(parts) > 1:
        return "privacy"
    if "class_path" in item.key.split(".") or any(
        "class_path" in v or "init_args" in v for v in item.values
    ):
        return "class"
    if any(key == c or key.startswith(c + ".") for c in CLASS_KEYS) or "init_args" in item.key:
        return "class"
    protected = PATH_KEYS | CLASS_KEYS | {"privacy.level"}
    if len(parts) == 1 or any(p.startswith(key + ".") for p in protected):
        return "group"
    return None


def allowed_keys(node_config: dict) -> tuple[str, ...]:
    """The node config's ``allow-overrides``, as dotted keys."""
    raw = node_config.get(ALLOW_OVERRIDES, "")
    keys = re.split(r"[,\s]+", str(raw).strip())
    return tuple(_match_form(k.removeprefix("--")) for k in keys if k)


def is_allowed(item: Override, allowed: tuple[str, ...]) -> bool:
    """Whether ``allowed`` names ``item``'s key or a group above it."""
    key = _match_form(item.key)
    return any(key == a or key.startswith(a + ".") for a in allowed)


def refused_overrides(overrides: str, allowed: tuple[str, ...]) -> list[tuple[Override, str]]:
    """The protected items of ``overrides`` that ``allowed`` does not name, with their rule."""
    refused = []
    for item in parse_overrides(overrides):
        rule = classify(item)
        if rule is not None and not is_allowed(item, allowed):
            refused.append((item, rule))
    return refused


def check_overrides(overrides: str, node_config: dict) -> None:
    """Refuse the run config's ``overrides`` if a protected one is not allowed by the node.

    Raises:
        OverrideRefused: naming each refused override, its rule and the node-config key.
    """
    refused = refused_overrides(overrides, allowed_keys(node_config))
    if not refused:
        return
    lines = [f"  {item.text()}  (rule {rule}: it {RULES[rule]})" for item, rule in refused]
    names = ",".join(dict.fromkeys(_match_form(item.key) for item, _ in refused))
    raise OverrideRefused(
        "this node refuses run-config overrides its operator did not allow:\n"
        + "\n".join(lines)
        + f"\nIf this node's operator accepts them, restart the SuperNode with --node-config "
        f"'{ALLOW_OVERRIDES}=\"{names}\"' (with the node's other keys); see docs/flower.md, "
        '"Node config keys".'
    )


def is_locked(node_config: dict) -> bool:
    """Whether the node's operator set a policy (pinned YAML or an allowlist)."""
    return PINNED_CONFIG in node_config or ALLOW_OVERRIDES in node_config


def node_run_config(run: Any, node_config: dict) -> Any:
    """The run config this node obeys: ``run`` (a :class:`~flora_lightning.flower.app_config.
    FlowerRunConfig`) with the node's pinned YAML, its overrides checked (a locked node).

    Raises:
        OverrideRefused: a protected override the node config does not allow.
    """
    if not is_locked(node_config):
        _warn_once(
            f"this node reads the YAML the run config names (config={run.config!r}) and applies "
            "its overrides unchecked (paths, model, classes, privacy): start the SuperNode with "
            f"--node-config '{PINNED_CONFIG}=\"/path/flora.yaml\"' to pin its YAML and refuse "
            'overrides it does not allow (docs/flower.md, "Node config keys").'
        )
        return run
    check_overrides(run.overrides, node_config)
    pinned = node_config.get(PINNED_CONFIG)
    if pinned is None:
        return run
    pinned = str(pinned)
    if pinned != run.config:
        _warn_once(
            f"this node reads its pinned node-config {PINNED_CONFIG}={pinned!r}; the run config's "
            f"config={run.config!r} is ignored."
        )
    return dataclasses.replace(run, config=pinned)


def node_clip_norm(node_config: dict) -> float | None:
    """The node config's ``clip-norm`` (None: not set).

    Raises:
        ValueError: not a finite number > 0, naming the key.
    """
    if CLIP_NORM not in node_config:
        return None
    value = node_config[CLIP_NORM]
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = math.nan
    if isinstance(value, bool) or not (math.isfinite(bound) and bound > 0):
        raise ValueError(
            f"node_config {CLIP_NORM}={value!r} must be a finite number > 0 (this node's "
            "client-side clipping bound), e.g. --node-config 'clip-norm=1.0'."
        )
    return bound


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
