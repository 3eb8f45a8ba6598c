"""Refuse to resume a run with a config that changes what was trained.

Resuming continues the saved global state, client optimizer states and history; a config whose
method, adapter shape, data or partition differ would mix two experiments in one run folder
(or fail later on mismatched tensors). The run's first ``config.yaml`` is compared with the new
one on those fields; the rest (rounds, outputs, progress, ...) may change. Every ``privacy.*``
field is fixed: a resume that changed the level, noise or bounds would continue a private run
under another (or no) guarantee while its accountant reports the old one.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FIXED = (
    "model.class_path",
    "model.init_args.name_or_path",
    "model.init_args.lora",
    "data.dataset",
    "data.subset",
    "data.data_dir",
    "data.data_files",
    "data.image_column",
    "data.label_column",
    "data.class_names",
    "data.template",
    "data.train_split",
    "data.test_split",
    "data.pool_splits",
    "data.test_fraction",
    "data.max_test_samples",
    "data.partition",
    "trainer.seed",
    "privacy",
)
"""Dotted config fields (dict-valued ones compared leaf by leaf) a resumed run must keep."""


def _leaves(value, name: str) -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{name}.{key}"))
        return out
    return {name: value}


def _get(config: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def fixed_values(config: dict) -> dict[str, object]:
    """The leaves of every :data:`FIXED` field of ``config`` (what identifies its run)."""
    values: dict[str, object] = {}
    for field in FIXED:
        values.update(_leaves(_get(config, field), field))
    return values


def changed_fields(saved: dict, new: dict) -> list[str]:
    """``field: saved -> new`` for every fixed field that differs (CLI names, no init_args)."""
    changes = []
    for field in FIXED:
        old_leaves, new_leaves = (
            _leaves(_get(saved, field), field),
            _leaves(_get(new, field), field),
        )
        for name in sorted(set(old_leaves) | set(new_leaves)):
            before, after = old_leaves.get(name), new_leaves.get(name)
            if before != after:
                shown = name.replace(".init_args.", ".")
                changes.append(f"{shown}: {before!r} -> {after!r}")
    return changes


def check_resumable(run_dir: Path, config_yaml: str) -> None:
    """Raise if ``config_yaml`` changes a fixed field of the run saved in ``run_dir``.

    Raises:
        ValueError: naming each differing field with its saved and new value.
    """
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return
    changes = changed_fields(yaml.safe_load(saved_file.read_text()), yaml.safe_load(config_yaml))
    if changes:
        raise ValueError(
            f"trainer.resume: the run in {run_dir} was made with another config; these fields "
            f"differ: {'; '.join(changes)}. Resume with the run's own settings "
            f"(--config {saved_file}) or choose another trainer.default_root_dir."
        )
