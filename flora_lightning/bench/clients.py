"""``flora bench --clients '[10, 100, 1000]'``: the loop's cost per client as clients grow.

For each N, in fresh processes (:mod:`flora_lightning.bench.clients_worker`; one writes the
data, another measures), the in-process :class:`~flora_lightning.federation.loop.FederatedLoop` runs
``--client_rounds`` round(s) of FLoRA on ``--arch`` (``tiny``: the offline tiny CLIP;
``vit-b-32``: a random-init CLIP of ViT-B/32 shapes) with cached image features, so only the
text tower trains: N clients, :data:`PER_CLIENT` synthetic images each, one local step per
client. Twice: optimizer states in memory, and spilled to disk
(``trainer.client_state_dir``). For the N in ``--flower_clients`` the same config also runs on
Flower's simulation engine (Ray), for the wall-time ratio.

Measured per client-round: seconds (the round's time / N); the loop overhead (the round's
time minus the clients' local fits and the evaluation, plus the optimizer-state store's
reads and writes, / N: sampling, state swap, store, aggregation, bookkeeping); the peak RSS of
the process during the run, its growth over the smallest N and per added client, against the
per-client state the run keeps (:mod:`flora_lightning.bench.client_memory`: optimizer states,
partition indices, cached features, round records); the bytes of optimizer state kept per
client (and of those, in RAM). Results: ``clients.json``, ``clients.md`` and
``clients.png`` in ``<out>/clients`` (with ``--results DIR`` also dated copies there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from flora_lightning.bench.config import BenchConfig

PER_CLIENT = 2
"""Synthetic training images per client (one local step at batch 2)."""
ARCHS = {"tiny": "the offline tiny CLIP", "vit-b-32": "a random-init CLIP of ViT-B/32 shapes"}
"""``--arch``: the model each point trains (its text tower; image features are cached)."""
OVERHEAD_TARGET_MS = 5.0
"""The loop's overhead per client-round it is checked against (issue 13)."""
ROW = (
    "| {clients:,} | {store} | {seconds_per_client_round:.4f} | {fit_seconds_per_client:.4f} "
    "| {overhead_ms_per_client:.2f} | {store_ms_per_client:.2f} | {peak_rss_mb:.0f} "
    "| {growth_mb:+.0f} | {growth_kb_per_client} | {kept} | {state_bytes_per_client:,.0f} "
    "| {state_bytes_in_ram_per_client:,.0f} | {flower} |"
)
HEADER = (
    "| clients | optimizer states | s / client-round | local fit s / client | loop overhead ms "
    "/ client | of which state store ms | peak RSS MB | growth vs smallest N MB | growth KB / "
    "added client (end of run: anon, file) | kept KB / client (optimizer, indices, features, records) | optimizer state "
    "bytes / client | in RAM / client | Flower s / client-round (x loop) |\n"
    "|--:|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|---|"
)


def run_worker(spec: dict) -> dict:
    """One scan point in a fresh process, its data and YAML written by another one before (so
    the measured process's memory holds nothing of the data generation); its result (JSON) is
    kept next to its work folder."""
    Path(spec["result"]).unlink(missing_ok=True)
    command = [sys.executable, "-m", "flora_lightning.bench.clients_worker", "--spec"]
    done = subprocess.run(command + [json.dumps(spec), "--prepare"], capture_output=True, text=True)
    if done.returncode == 0:
        done = subprocess.run(command + [json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["result"]).exists():
        raise RuntimeError(
            f"bench clients worker ({spec['runtime']}, {spec['clients']} clients) failed "
            f"(exit {done.returncode}):\n"
            + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        )
    return json.loads(Path(spec["result"]).read_text())


def run_client_scan(cfg: BenchConfig) -> dict:
    """Every point of the scan, then ``clients.json``, ``clients.md`` and ``clients.png``."""
    start = time.perf_counter()
    out = Path(cfg.out) / "clients"
    out.mkdir(parents=True, exist_ok=True)
    points = [(n, "loop", store) for n in cfg.clients for store in ("memory", "disk")]
    points += [(n, "flower", "memory") for n in cfg.flower_clients]
    results = []
    for n, runtime, store in points:
        name = f"{runtime}_{store}_{n}" if runtime == "loop" else f"flower_{n}"
        print(f"[bench clients] {name} ...", flush=True)
        t0 = time.perf_counter()
        spec = {
            "clients": n, "runtime": runtime, "store": store, "rounds": cfg.client_rounds,
            "per_client": PER_CLIENT, "num_classes": cfg.num_classes, "seed": cfg.seed,
            "arch": cfg.arch, "cpus_per_client": 1.0, "work_dir": str(out / name),
            "result": str(out / f"{name}.json"), "parallel_clients": cfg.client_scan_parallel,
        }  # fmt: skip
        results.append(run_worker(spec))
        print(f"[bench clients] {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    report = {
        "config": {
            "arch": cfg.arch,
            "clients": cfg.clients,
            "flower_clients": cfg.flower_clients,
            "rounds": cfg.client_rounds,
            "per_client": PER_CLIENT,
            "seed": cfg.seed,
            "parallel_clients": cfg.client_scan_parallel,
        },  # fmt: skip
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - start,
        "rows": rows(results),
        "overhead_target_ms": OVERHEAD_TARGET_MS,
    }
    (out / "clients.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "clients.md").write_text(text)
    plot(report, out / "clients.png")
    print(text)
    if cfg.results is not None:  # dated copies: <date>-clients-scan-<arch>[-k<K>]
        folder = Path(cfg.results)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{date.today().isoformat()}-clients-scan-{cfg.arch}"
        if cfg.client_scan_parallel > 1:
            name += f"-k{cfg.client_scan_parallel}"
        for suffix in (".md", ".json", ".png"):
            shutil.copyfile(out / f"clients{suffix}", folder / f"{name}{suffix}")
    return report


def rows(results: list[dict]) -> list[dict]:
    """One row per (N, store) of the loop, with Flower's numbers joined to the memory row."""
    loop = [r for r in results if r["runtime"] == "loop"]
    flower = {r["clients"]: r for r in results if r["runtime"] == "flower"}
    base = {  # the smallest N of each store: growth is measured from it
        s: min((r for r in loop if r["store"] == s), key=lambda r: r["clients"])
        for s in ("memory", "disk")
    }
    table = []
    for r in sorted(loop, key=lambda r: (r["store"] != "memory", r["clients"])):
        row = {k: r[k] for k in r if k not in ("work_dir", "result")}
        row["store_ms_per_client"] = 1000 * r["store_seconds_per_client"]
        start = base[r["store"]]
        row["growth_mb"] = r["peak_rss_mb"] - start["peak_rss_mb"]
        added = r["clients"] - start["clients"]
        row["growth_bytes_per_added_client"] = row["growth_mb"] * 2**20 / added if added else None
        for kind in ("anon", "file"):  # the end-of-run RSS by kind, per added client
            end, begin = r.get(f"end_rss_{kind}_mb"), start.get(f"end_rss_{kind}_mb")
            grown = None if end is None or begin is None or not added else (end - begin) / added
            row[f"end_{kind}_growth_bytes_per_added_client"] = (
                None if grown is None else grown * 2**20
            )
        row["meets_overhead_target"] = r["overhead_ms_per_client"] <= OVERHEAD_TARGET_MS
        if r["store"] == "memory" and r["clients"] in flower:
            f = flower[r["clients"]]
            row["flower_seconds_per_client_round"] = f["seconds_per_client_round"]
            row["flower_wall_seconds"] = f["wall_seconds"]
            row["flower_vs_loop"] = f["seconds_per_client_round"] / r["seconds_per_client_round"]
            row["flower_wall_vs_loop"] = f["wall_seconds"] / r["wall_seconds"]
        table.append(row)
    return table


def markdown(report: dict) -> str:
    """``clients.md``, from the report data alone."""
    lines = [
        "# flora bench --clients: loop cost per client as clients grow",
        "",
        f"FLoRA on {ARCHS[report['config']['arch']]}, cached image features, {report['config']['per_client']}"
        f" synthetic images and 1 local step per client, {report['config']['rounds']} round(s),"
        f" {report['config'].get('parallel_clients', 1)} client(s) at a time in the loop;"
        f" CPU, {report['cpu_count']} cores, load average {report['load_average']:.1f} at the "
        f"end; wall time {report['wall_seconds']:.0f} s.",
        "",
        HEADER,
    ]
    for row in report["rows"]:
        flower = "-"
        if "flower_vs_loop" in row:
            flower = (f"{row['flower_seconds_per_client_round']:.3f} "
                      f"(x{row['flower_vs_loop']:.1f}; wall x{row['flower_wall_vs_loop']:.1f})")  # fmt: skip
        kb = row["kept_bytes_per_client"]
        kept = (f"{kb['total'] / 1e3:.1f} ({kb['optimizer_state'] / 1e3:.1f}, "
                f"{(kb['partition_indices'] + kb['label_counts']) / 1e3:.2f}, "
                f"{kb['cached_features'] / 1e3:.2f}, {kb['round_records'] / 1e3:.2f})")  # fmt: skip
        growth = row["growth_bytes_per_added_client"]
        growth = "-" if growth is None else f"{growth / 1e3:.1f}"
        anon, file = (row.get(f"end_{k}_growth_bytes_per_added_client") for k in ("anon", "file"))
        if growth != "-" and anon is not None and file is not None:
            growth += f" ({anon / 1e3:.1f}, {file / 1e3:.1f})"
        lines.append(ROW.format(**row, flower=flower, kept=kept, growth_kb_per_client=growth))
    lines += [
        "",
        "- Loop overhead = (round seconds - local fit seconds - evaluation seconds) / N, where "
        "the local fit excludes the optimizer-state store's reads and writes (counted as "
        f"overhead); target <= {report['overhead_target_ms']:g} ms. Round seconds end before "
        "the round's TensorBoard logging and checkpoint/resume-state writes (not counted).",
        "- Peak RSS: the whole process during the run (runtime, model, data, cached features, "
        "states); growth against the smallest N of the same store.",
        "- Growth KB / added client: the peak's growth over the smallest N divided by the "
        "clients added; in brackets the end-of-run RSS growth per added client by kind: "
        "anonymous (the heap: state, allocator overhead, freed memory not given back) and "
        "file-backed (mapped files: the dataset's memory-mapped pages the run read, which grow "
        "with the images read, not with state). "
        "kept KB / client: the per-client state the finished run holds in RAM, read from its "
        "structures (flora_lightning.bench.client_memory): optimizer states, partition indices "
        "and label counts, cached image features, per-client entries of the round records "
        "(payload bytes, without allocator or object headers).",
        "- State bytes: the optimizer (Adam) state kept per client (in memory: tensor bytes; "
        "disk: file bytes); in RAM: 0 with trainer.client_state_dir.",
        "- Flower: the same YAML on flwr's simulation engine (Ray, 1 CPU per virtual node); "
        "x = Flower's round seconds over the loop's; wall = whole run incl. start-up.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Seconds per client-round and peak RSS against N (log x), one line per store."""
    from flora_lightning.sweep.plots import require_pyplot

    plt = require_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for store in ("memory", "disk"):
        rs = [r for r in report["rows"] if r["store"] == store]
        ns = [r["clients"] for r in rs]
        left.plot(ns, [r["seconds_per_client_round"] for r in rs], "o-", label=f"loop, {store}")
        right.plot(ns, [r["peak_rss_mb"] for r in rs], "o-", label=f"loop, {store}")
    fl = [r for r in report["rows"] if "flower_vs_loop" in r]
    if fl:
        left.plot([r["clients"] for r in fl], [r["flower_seconds_per_client_round"] for r in fl],
                  "s--", label="Flower simulation")  # fmt: skip
    for ax, label in ((left, "seconds per client-round"), (right, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
