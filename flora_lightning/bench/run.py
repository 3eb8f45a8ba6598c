"""``flora bench``'s entry points: one worker process per method, the loop overhead, the report.

The options are :class:`~flora_lightning.bench.config.BenchConfig`'s fields, read by jsonargparse
from the dataclass (types, defaults and attribute docstrings), as ``flora fit`` reads its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

from flora_lightning.bench.config import BenchConfig, variants
from flora_lightning.bench.overhead import measure_loop_overhead
from flora_lightning.bench.report import (
    ab_markdown,
    check_targets,
    derive,
    machine_description,
    markdown,
)


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every method (each in a fresh process) and the loop overhead; write the report.

    With ``cfg.clients``, the clients scan instead (:mod:`flora_lightning.bench.clients`).

    Returns:
        What ``<cfg.out>/bench.json`` holds; ``bench.md`` is rendered from it.
    """
    if cfg.clients:
        from flora_lightning.bench.clients import run_client_scan

        return run_client_scan(cfg)
    if cfg.parallel_clients:
        return run_parallel_round(cfg)
    if cfg.compile == "ab":
        return run_ab(cfg)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [measure(cfg, variant, cfg.compile == "on" and "compiled") for variant in cfg.methods]
    report = finish_report(cfg, results, start)
    copy_results(cfg, out)
    return report


def run_parallel_round(cfg: BenchConfig) -> dict:
    """``--parallel_clients K ...``: a round of clients one after another and K at a time;
    writes ``parallel_clients.json``/``.md`` (and the dated copy with ``--results``)."""
    from flora_lightning.bench.parallel_clients import markdown as parallel_markdown
    from flora_lightning.bench.parallel_clients import measure_parallel_round

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {cfg.parallel_round_clients} clients, K = {cfg.parallel_clients} ...")
    result = measure_parallel_round(
        arch=cfg.arch,
        clients=cfg.parallel_round_clients,
        parallel_clients=tuple(cfg.parallel_clients),
        batch_size=cfg.batch_size,
        num_classes=cfg.num_classes,
        rounds=7,
        accelerator=cfg.device,
        seed=cfg.seed,
        cuda_graphs=cfg.cuda_graphs,
        compile=cfg.compile == "on",
    )
    result["command"] = "flora bench " + " ".join(cfg.to_argv())
    (out / "parallel_clients.json").write_text(json.dumps(result, indent=2) + "\n")
    text = f"# flora bench --parallel_clients\n\n`{result['command']}`\n\n" + parallel_markdown(
        result
    )
    (out / "parallel_clients.md").write_text(text)
    print(text)
    if cfg.results is not None:
        folder = Path(cfg.results)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{date.today().isoformat()}-bench-parallel-clients-{cfg.arch}-{cfg.device}"
        for suffix in (".md", ".json"):
            shutil.copyfile(out / f"parallel_clients{suffix}", folder / f"{name}{suffix}")
    return result


def measure(cfg: BenchConfig, variant: str, label: str | bool = "") -> dict:
    """:func:`run_worker` with progress lines."""
    t0 = time.perf_counter()
    arm = f" ({label})" if label else ""
    print(f"[bench] {variant}{arm}: measuring in a fresh process ...", flush=True)
    result = run_worker(cfg, variant)
    print(f"[bench] {variant}{arm}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    return result


def run_ab(cfg: BenchConfig) -> dict:
    """Each method eager and then compiled (CUDA graphs as ``cfg.cuda_graphs`` says), one
    after the other in one run, so both arms see the same machine; each arm writes a full
    report in ``<out>/eager`` and ``<out>/compiled``, and ``<out>/bench.md`` sets them side
    by side."""
    start = time.perf_counter()
    out = Path(cfg.out)
    arms = {
        "eager": replace(cfg, compile="off", cuda_graphs="off", out=str(out / "eager")),
        "compiled": replace(cfg, compile="on", out=str(out / "compiled"), loop_overhead=False),
    }
    results = {arm: [] for arm in arms}
    for variant in cfg.methods:
        for arm, arm_cfg in arms.items():
            results[arm].append(measure(arm_cfg, variant, arm))
    reports = {arm: finish_report(arm_cfg, results[arm], start) for arm, arm_cfg in arms.items()}
    report = {
        "config": asdict(cfg),
        "machine": machine_description(cfg),
        "wall_seconds": time.perf_counter() - start,
        "arms": reports,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = ab_markdown(report)
    (out / "bench.md").write_text(text)
    print(text)
    copy_results(cfg, out)
    return report


def finish_report(cfg: BenchConfig, results: list[dict], start: float) -> dict:
    """The loop overhead (if asked), the ratios and targets; writes ``bench.json``/``.md``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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


def copy_results(cfg: BenchConfig, out: Path) -> None:
    """With ``cfg.results``: ``bench.md``/``.json`` copied to a dated file there."""
    if cfg.results is None:
        return
    folder = Path(cfg.results)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{date.today().isoformat()}-bench-{cfg.arch}-{cfg.device}-{cfg.precision}"
    if cfg.compile != "off":
        name += f"-{cfg.compile}"
    if cfg.methods != list(variants()):  # a subset: its own file, not the full table's
        name += "-" + "-".join(cfg.methods)
    for suffix in (".md", ".json"):
        shutil.copyfile(out / f"bench{suffix}", folder / f"{name}{suffix}")
    if cfg.compile == "ab":  # each arm's full report beside the side-by-side one
        for arm in ("eager", "compiled"):
            shutil.copyfile(out / arm / "bench.md", folder / f"{name}-{arm}.md")
    print(f"[bench] results: {folder / name}.md", flush=True)


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
