"""The cells of a sweep: grid expansion, stable ids, shards, and validation with the real parser.

A cell is one ``flora fit`` run, ``dataset x partition x method x seed``, in
``OUT/<dataset>/<partition>/<method>/seed<k>/``. Its arguments are, in this order (later ones
win, and jsonargparse merges nested sections such as ``data.partition`` rather than replacing
them)::

    --config BASE  [dataset overlay]  [method: --config {model: ...} | --model NAME]
    [partition: --config FILE | --config {data: {partition: {...}}}]
    --trainer.seed K --data.partition.seed K  [--trainer.callbacks [...]]  OVERRIDES
    --trainer.default_root_dir OUT/<dataset>/<partition>/<method>/seed<K>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flora_lightning.sweep.spec import SweepSpec

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid; cells sort by (dataset, partition, method, seed)."""

    dataset: str
    """Key in the spec's ``datasets``."""
    partition: str
    """Key in the spec's ``partitions``."""
    method: str
    """Key in the spec's ``methods``."""
    seed: int
    """One of the spec's ``seeds``."""

    @property
    def id(self) -> str:
        """``<dataset>/<partition>/<method>/seed<k>``: also the cell's folder under OUT."""
        return f"{self.dataset}/{self.partition}/{self.method}/seed{self.seed}"

    def run_dir(self, out: str | Path) -> Path:
        return Path(out) / self.dataset / self.partition / self.method / f"seed{self.seed}"


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, sorted (the order shards and runs use; stable for a spec)."""
    return sorted(
        Cell(dataset, partition, method, seed)
        for dataset in spec.datasets
        for partition in spec.partitions
        for method in spec.methods
        for seed in spec.seeds
    )


def cell_args(spec: SweepSpec, cell: Cell, out: str | Path) -> list[str]:
    """The ``flora fit`` arguments of ``cell`` (without the ``fit`` itself)."""
    return [
        *spec.base_args(),
        *spec.dataset_args(cell.dataset),
        *spec.method_args(cell.method),
        *spec.partition_args(cell.partition),
        *spec.seed_args(cell.seed),
        *spec.common_args(),
        "--trainer.default_root_dir",
        str(cell.run_dir(out)),
    ]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based: ``1/4`` ... ``4/4``): cell k (0-based, in sorted
    order) belongs to shard ``k % count + 1``, so slow methods spread over the shards."""

    index: int
    """Which shard, 1 <= index <= count."""
    count: int
    """How many shards the cells are split into."""

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` with ``1 <= i <= n``; anything else raises a ValueError naming --shard."""
        match = _SHARD.match(str(text))
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise ValueError(
                f"sweep --shard {text!r}: expected i/n with 1 <= i <= n (1-based), e.g. "
                "--shard 1/4 ... --shard 4/4 to split the cells over 4 machines."
            )
        return cls(int(match[1]), int(match[2]))

    def select(self, cells: list[Cell]) -> list[Cell]:
        return [c for k, c in enumerate(cells) if k % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def validate_cells(spec: SweepSpec, cells: list[Cell], out: str | Path) -> dict[Cell, object]:
    """Parse and instantiate every cell's config with ``flora fit``'s own parser.

    Instantiating builds the method, data module and loop objects, which checks every field
    (``data.partition.beta > 0``, ...) but loads no model or data and writes nothing.

    Returns:
        Cell -> its parsed config (a jsonargparse Namespace; ``config.trainer.rounds``, ...).

    Raises:
        ValueError: naming each failing cell (up to five) with the field and the parser's
            message, before any cell has run.
    """
    from flora_lightning.stages import stage_parser

    parser = stage_parser("fit")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    configs, problems = {}, []
    for cell in cells:
        try:
            config = parser.parse_args(cell_args(spec, cell, out))
            instantiate(config)
        except Exception as err:  # the parser's and the classes' own checks, all of them
            message = " ".join(str(err).split())
            problems.append(
                f"cell {cell.id} (datasets.{cell.dataset}, partitions.{cell.partition}, "
                f"methods.{cell.method}, seed {cell.seed}): {message}"
            )
            continue
        configs[cell] = config
    if problems:
        more = f"\n... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"{spec.source}: {len(problems)} of {len(cells)} cells do not validate; "
            "nothing was run:\n" + "\n".join(problems[:5]) + more
        )
    return configs
