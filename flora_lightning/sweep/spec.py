"""The sweep spec: a YAML file naming the grid's axes and the base config of every cell.

Example (``configs/sweeps/offline.yaml``)::

    base: ../quickstart.yaml                 # paths are relative to the sweep file
    overrides: ["--trainer.rounds", "5"]     # `flora fit` arguments for every cell
    datasets: {digits: null}                 # null: the base config's own data
    methods: {FLoRA: ../quickstart.yaml, FedLC: ../quickstart_fedlc.yaml, FedAA: FedAA}
    partitions: {iid: ../partitions/iid.yaml, dir0.1: {kind: dirichlet, beta: 0.1}}
    seeds: [0, 1]
    callbacks: [MemoryProfiler]

Every axis entry is turned into ``flora fit`` arguments here (:meth:`SweepSpec.dataset_args`,
...), after checking what can be checked without the parser: names usable as folder names,
files that exist, method names that resolve, partition fields and kinds that exist. Whether a
whole cell's config is valid is checked with the real parser in
:func:`flora_lightning.sweep.cells.validate_cells`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flora_lightning.data.partition import PartitionConfig
from flora_lightning.methods import METHODS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_RESERVED = {"report"}  # OUT/report holds the tables
_OWNED_FLAGS = ("--trainer.default_root_dir", "--trainer.resume")
PARTITION_FIELDS = tuple(f.name for f in dataclasses.fields(PartitionConfig))
"""``data.partition`` fields a partition entry may set (``seed`` comes from ``seeds``)."""
PARTITION_KINDS = typing.get_args(typing.get_type_hints(PartitionConfig)["kind"])
"""Valid ``data.partition.kind`` values."""


@dataclass
class SweepSpec:
    """A grid of ``flora fit`` runs: datasets x partitions x methods x seeds on one base config.

    Relative paths are resolved against ``root`` (the sweep file's folder).
    """

    base: str
    """Base ``flora fit`` config every cell starts from."""
    datasets: dict[str, str | None]
    """Dataset name -> config overlay applied after the base (null: the base's own data)."""
    methods: dict[str, str | dict | None]
    """Method name -> a YAML file whose ``model`` section is used, an inline ``model`` section
    (``{class_path: ..., init_args: ...}``), a method name (``FLoRA``, ``fedlc``, a class
    path; keeps the base's ``name_or_path`` and ``optimizer``) or null (the entry's own name)."""
    partitions: dict[str, str | dict]
    """Partition name -> ``data.partition`` fields inline (``{kind: dirichlet, beta: 0.1}``) or a
    YAML overlay holding ``data: {partition: {...}}``; unset fields keep the base's values."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; each sets ``trainer.seed`` and ``data.partition.seed``."""
    overrides: list[str] = field(default_factory=list)
    """``flora fit`` arguments applied to every cell after the axes, e.g.
    ``["--trainer.rounds", "5"]``."""
    callbacks: list[str | dict] = field(default_factory=list)
    """``trainer.callbacks`` of every cell (replacing the base's): class names such as
    ``MemoryProfiler`` or ``{class_path: ..., init_args: ...}``."""
    root: str = "."
    """Folder relative paths are resolved against (set by :func:`load_spec`, not in the YAML)."""
    source: str = "sweep"
    """Where the spec came from, named in error messages (set by :func:`load_spec`)."""

    def __post_init__(self) -> None:
        """Check every entry; errors name ``<file>: <axis>.<entry>`` and the fix."""
        self._base_path = self._existing_file("base", self.base)
        for axis in ("datasets", "methods", "partitions"):
            entries = getattr(self, axis)
            if not isinstance(entries, dict) or not entries:
                self._fail(axis, f"must be a non-empty mapping of name -> entry (got {entries!r})")
            for name in entries:
                if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
                    self._fail(
                        f"{axis}.{name}",
                        "names become folder names: use letters, digits and . _ + - "
                        f"(not starting with . or -), and not {', '.join(sorted(_RESERVED))}",
                    )
        if (
            not isinstance(self.seeds, list)
            or not self.seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)
            or len(set(self.seeds)) != len(self.seeds)
        ):
            self._fail("seeds", f"must be a non-empty list of distinct integers (got {self.seeds})")
        if not isinstance(self.overrides, list) or not all(
            isinstance(a, str) for a in self.overrides
        ):
            self._fail("overrides", f"must be a list of strings (got {self.overrides!r})")
        for arg in self.overrides:
            if arg.split("=", 1)[0] in _OWNED_FLAGS:
                self._fail("overrides", f"{arg} is set per cell by the sweep; remove it")
        self._dataset_args = {n: self._resolve_dataset(n, v) for n, v in self.datasets.items()}
        self._method_args = {n: self._resolve_method(n, v) for n, v in self.methods.items()}
        self._partition_args = {
            n: self._resolve_partition(n, v) for n, v in self.partitions.items()
        }
        self._callback_args = self._resolve_callbacks()

    # ------------------------------------------------------------ arguments
    def base_args(self) -> list[str]:
        return ["--config", str(self._base_path)]

    def dataset_args(self, name: str) -> list[str]:
        return list(self._dataset_args[name])

    def method_args(self, name: str) -> list[str]:
        return list(self._method_args[name])

    def partition_args(self, name: str) -> list[str]:
        return list(self._partition_args[name])

    def seed_args(self, seed: int) -> list[str]:
        return ["--trainer.seed", str(seed), "--data.partition.seed", str(seed)]

    def common_args(self) -> list[str]:
        """Callbacks, then the overrides: applied to every cell after its axes."""
        return [*self._callback_args, *self.overrides]

    # ------------------------------------------------------------ resolving
    def _fail(self, where: str, message: str) -> typing.NoReturn:
        raise ValueError(f"{self.source}: {where}: {message}")

    def _existing_file(self, where: str, value) -> Path:
        if not isinstance(value, str) or not value:
            self._fail(where, f"expected a path to a YAML file (got {value!r})")
        path = (Path(self.root) / value).resolve()
        if not path.is_file():
            self._fail(
                where,
                f"file {value} does not exist (looked for {path}); paths are relative to the "
                "sweep file",
            )
        return path

    def _yaml_file(self, where: str, value) -> dict:
        path = self._existing_file(where, value)
        content = yaml.safe_load(path.read_text())
        if not isinstance(content, dict):
            self._fail(where, f"{value} must hold a YAML mapping")
        return content

    def _resolve_dataset(self, name: str, value) -> list[str]:
        if value is None:
            return []
        path = self._existing_file(f"datasets.{name}", value)
        return ["--config", str(path)]

    def _resolve_method(self, name: str, value) -> list[str]:
        where = f"methods.{name}"
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            model = self._yaml_file(where, value).get("model")
            if not isinstance(model, dict) or "class_path" not in model:
                self._fail(where, f"{value} has no `model: {{class_path: ...}}` section")
            return ["--config", json.dumps({"model": model})]
        if isinstance(value, dict):
            if "class_path" not in value:
                self._fail(where, "an inline model section needs a class_path, e.g. FedLC")
            return ["--config", json.dumps({"model": value})]
        if value is not None and not isinstance(value, str):
            self._fail(where, f"expected a method name, a YAML file or a mapping (got {value!r})")
        method = name if value is None else value
        if "." in method:  # a class path: checked by the parser with each cell
            return ["--model", method]
        by_name = {cls.__name__.lower(): cls for cls in METHODS.values()}
        by_name.update({short: cls for short, cls in METHODS.items()})
        cls = by_name.get(method.lower())
        if cls is None:
            self._fail(
                where,
                f"unknown method {method!r}; use one of "
                f"{', '.join(c.__name__ for c in METHODS.values())}, a class path, a model "
                "overlay YAML file or an inline {class_path: ...}",
            )
        return ["--model", cls.__name__]

    def _resolve_partition(self, name: str, value) -> list[str]:
        where = f"partitions.{name}"
        if isinstance(value, str):
            data = self._yaml_file(where, value).get("data") or {}
            fields = data.get("partition") if isinstance(data, dict) else None
            if not isinstance(fields, dict):
                self._fail(where, f"{value} has no `data: {{partition: {{...}}}}` section")
            self._check_partition_fields(where, fields)
            return ["--config", str(self._existing_file(where, value))]
        if not isinstance(value, dict):
            self._fail(
                where, f"expected data.partition fields or a YAML overlay file (got {value!r})"
            )
        self._check_partition_fields(where, value)
        return ["--config", json.dumps({"data": {"partition": value}})]

    def _check_partition_fields(self, where: str, fields: dict) -> None:
        allowed = [f for f in PARTITION_FIELDS if f != "seed"]
        for key in fields:
            if key == "seed":
                self._fail(f"{where}.seed", "data.partition.seed is set by `seeds`; remove it")
            if key not in allowed:
                self._fail(
                    f"{where}.{key}",
                    f"unknown data.partition field; use one of {', '.join(allowed)}",
                )
        kind = fields.get("kind")
        if kind is not None and kind not in PARTITION_KINDS:
            self._fail(
                f"{where}.kind",
                f"unknown partition kind {kind!r}; use one of {', '.join(PARTITION_KINDS)}",
            )

    def _resolve_callbacks(self) -> list[str]:
        if not isinstance(self.callbacks, list):
            self._fail("callbacks", f"must be a list (got {self.callbacks!r})")
        if not self.callbacks:
            return []
        entries = []
        for i, callback in enumerate(self.callbacks):
            if isinstance(callback, str):
                entries.append({"class_path": callback})
            elif isinstance(callback, dict) and "class_path" in callback:
                entries.append(callback)
            else:
                self._fail(
                    f"callbacks[{i}]",
                    f"expected a class name or {{class_path: ...}} (got {callback!r})",
                )
        return ["--trainer.callbacks", json.dumps(entries)]


SPEC_KEYS = ("base", "datasets", "methods", "partitions", "seeds", "overrides", "callbacks")
"""Keys a sweep YAML may hold."""


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML; relative paths in it are relative to its folder.

    Raises:
        ValueError: naming the file and the entry (``methods.FedFFT: ...``) when anything is
            missing, unknown or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep --config: {path} does not exist; give a sweep YAML file.")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping with keys {', '.join(SPEC_KEYS)}.")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(map(str, unknown))}; a sweep file holds "
            f"{', '.join(SPEC_KEYS)}."
        )
    missing = [k for k in ("base", "datasets", "methods", "partitions") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}.")
    return SweepSpec(**data, root=str(path.resolve().parent), source=str(path))
