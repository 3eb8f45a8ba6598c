"""``flora bench``'s entry points: run every method's worker, report, and the CLI parser."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from flora_lightning.bench.config import VARIANTS, BenchConfig
from flora_lightning.bench.overhead import measure_loop_overhead
from flora_lightning.bench.report import check_targets, derive, machine_description, markdown
from flora_lightning.bench.worker import measure_method, run_worker


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every method (each in a fresh process), the loop overhead; write the report."""
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in cfg.methods:
        t0 = time.perf_counter()
        print(f"[bench] {variant}: measuring in a fresh process ...", flush=True)
        results.append(run_worker(cfg, variant))
        print(f"[bench] {variant}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    loop = None
    if cfg.loop_overhead:
        print("[bench] loop overhead: 2 rounds of FederatedLoop ...", flush=True)
        loop = measure_loop_overhead(cfg)
    rows = derive(cfg, results)
    wall = time.perf_counter() - start
    machine = machine_description(cfg)
    report = {
        "config": asdict(cfg),
        "machine": machine,
        "steps_per_epoch": cfg.steps_per_epoch,
        "wall_seconds": wall,
        "methods": rows,
        "loop_overhead": loop,
        "targets": check_targets(rows, loop),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(cfg, rows, loop, wall, machine)
    (out / "bench.md").write_text(text)
    print(text)
    return report


def bench_parser():
    """``flora bench`` options (also ``python -m flora_lightning.bench``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="flora bench",
        description="Time, peak memory and bytes of each method's local training vs FedFFT.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    parser.add_argument(
        "--methods",
        type=str,
        nargs="+",
        default=list(VARIANTS),
        help=f"Methods to measure, space separated: {', '.join(VARIANTS)}.",
    )
    parser.add_class_arguments(BenchConfig, skip={"methods"}, instantiate=False)
    parser.add_argument(
        "--worker",
        type=str | None,
        default=None,
        help="Internal: measure this one method in this process and write its result file.",
    )
    return parser


def config_from(namespace) -> tuple[BenchConfig, str | None]:
    values = namespace.as_dict()
    values.pop("config", None)
    worker = values.pop("worker", None)
    return BenchConfig(**values), worker


def main(args: list[str] | None = None) -> dict | None:
    """``flora bench [options]``; with ``--worker METHOD``, measure one method and exit."""
    cfg, worker = config_from(bench_parser().parse_args(args))
    if worker is None:
        return run_bench(cfg)
    result = measure_method(cfg, worker)
    path = Path(cfg.out) / "workers" / f"{worker}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
