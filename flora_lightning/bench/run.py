"""``flora bench``'s entry points: one worker process per method, the loop overhead, the report.

The options are :class:`~flora_lightning.bench.config.BenchConfig`'s fields, read by jsonargparse
from the dataclass (types, defaults and attribute docstrings), as ``flora fit`` reads its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from flora_lightning.bench.config import BenchConfig
from flora_lightning.bench.overhead import measure_loop_overhead
from flora_lightning.bench.report import check_targets, derive, machine_description, markdown


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every method (each in a fresh process) and the loop overhead; write the report.

    With ``cfg.clients``, the clients scan instead (:mod:`flora_lightning.bench.clients`).

    Returns:
        What ``<cfg.out>/bench.json`` holds; ``bench.md`` is rendered from it.
    """
    if cfg.clients:
        from flora_lightning.bench.clients import run_client_scan

        return run_client_scan(cfg)
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
    report = {
        "config": asdict(cfg),
        "machine": machine_description(cfg),
        "cpu_count": os.cpu_count(),
        "steps_per_epoch": cfg.steps_per_epoch,
        "wall_seconds": time.perf_counter() - start,
        "methods": rows,
        "loop_overhead": loop,
        "targets": check_targets(rows, loop),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "bench.md").write_text(text)
    print(text)
    return report


def run_worker(cfg: BenchConfig, variant: str) -> dict:
    """Measure ``variant`` in a fresh Python process (``flora_lightning.bench.worker``).

    Its result file is kept in ``<cfg.out>/workers``.
    """
    result = Path(cfg.out) / "workers" / f"{variant}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "flora_lightning.bench.worker"]
    command += ["--cfg", json.dumps(asdict(cfg)), "--variant", variant]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(
            f"bench worker for {variant} failed (exit {done.returncode}):\n"
            + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        )
    return json.loads(result.read_text())


def bench_parser():
    """``flora bench`` options (also ``python -m flora_lightning.bench``): ``BenchConfig``'s."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="flora bench",
        description="Time, peak memory and bytes of each method's local training vs FedFFT.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    parser.add_class_arguments(BenchConfig, instantiate=False)
    return parser


def config_from(namespace) -> BenchConfig:
    """The :class:`BenchConfig` of a namespace parsed by :func:`bench_parser`."""
    values = namespace.as_dict()
    values.pop("config", None)
    return BenchConfig(**values)


def main(args: list[str] | None = None) -> dict:
    """``flora bench [options]`` (default: ``sys.argv``): parse, then :func:`run_bench`."""
    return run_bench(config_from(bench_parser().parse_args(args)))
