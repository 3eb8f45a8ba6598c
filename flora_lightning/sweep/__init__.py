"""``flora sweep``: a grid of ``flora fit`` runs and the paper's tables, from one YAML.

Usage::

    flora sweep --config configs/sweeps/offline.yaml --out runs/sweep_offline
    flora sweep --config configs/sweeps/offline.yaml --out runs/sweep_offline --dry_run
    flora sweep --config configs/sweeps/paper.yaml --out runs/paper --shard 2/4   # machine 2 of 4
    flora sweep --config configs/sweeps/paper.yaml --out runs/paper --report_only

The YAML (:class:`SweepSpec`) names a base config and the axes: datasets, methods, partitions
and seeds. Each cell, ``dataset x partition x method x seed``, is an ordinary ``flora fit`` run
directory ``OUT/<dataset>/<partition>/<method>/seed<k>/``. Every cell's config is parsed and
instantiated before any runs; re-running skips finished cells, resumes interrupted ones and
retries failed ones (``failed.json``). The tables (methods x datasets per partition, and the
cost per method) and plots in ``OUT/report`` are built from the run directories alone.
"""

from flora_lightning.sweep.cells import Cell, Shard, cell_args, expand_cells, validate_cells
from flora_lightning.sweep.command import (
    SweepOptions,
    options_from,
    run_command,
    spec_order,
    sweep_parser,
)
from flora_lightning.sweep.plots import accuracy_curve, plot_accuracy
from flora_lightning.sweep.report import CellRecord, build_report, collect, failures, mean_std
from flora_lightning.sweep.rundir import RunState, read_summary, run_state, write_failure
from flora_lightning.sweep.runner import CellResult, run_cell, run_sweep
from flora_lightning.sweep.spec import PARTITION_FIELDS, PARTITION_KINDS, SweepSpec, load_spec
from flora_lightning.sweep.tables import Table, latex_escape

__all__ = [
    "PARTITION_FIELDS",
    "PARTITION_KINDS",
    "Cell",
    "CellRecord",
    "CellResult",
    "RunState",
    "Shard",
    "SweepOptions",
    "SweepSpec",
    "Table",
    "accuracy_curve",
    "build_report",
    "cell_args",
    "collect",
    "expand_cells",
    "failures",
    "latex_escape",
    "load_spec",
    "mean_std",
    "options_from",
    "plot_accuracy",
    "read_summary",
    "run_cell",
    "run_command",
    "run_state",
    "run_sweep",
    "spec_order",
    "sweep_parser",
    "validate_cells",
    "write_failure",
]
