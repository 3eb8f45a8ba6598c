"""One point of ``flora bench --clients``: N clients on one runtime, in a fresh process.

``python -m flora_lightning.bench.clients_worker --spec JSON`` runs the scan's workload with
``spec["clients"]`` clients on the in-process :class:`~flora_lightning.federation.loop.FederatedLoop`
(``runtime: loop``, optimizer states in memory or, ``store: disk``, in
``trainer.client_state_dir``) or on Flower's simulation engine (``runtime: flower``,
:func:`~flora_lightning.flower.simulation.simulate`), and writes ``spec["result"]`` (JSON).
Both runtimes build the run from the same flora YAML (:func:`write_config`), so they train the
same model on the same partitions with the same seeds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flora_lightning.client_state.stores import ClientStates


class TimedStates(ClientStates):
    """Wraps the trainer's optimizer-state store and adds up the seconds its reads, writes and
    deletes take (the store's share of a client's fit, which the loop overhead counts)."""

    def __init__(self, inner: ClientStates) -> None:
        self.inner, self.seconds = inner, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getitem__(self, client: int) -> dict:
        return self._timed(self.inner.__getitem__, client)

    def __setitem__(self, client: int, state: dict) -> None:
        self._timed(self.inner.__setitem__, client, state)

    def __delitem__(self, client: int) -> None:
        self._timed(self.inner.__delitem__, client)

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, client: object) -> bool:
        return client in self.inner

    def packed(self, client: int):
        return self.inner.packed(client)

    def nbytes(self) -> int:
        return self.inner.nbytes()


def write_config(spec: dict, folder: Path) -> Path:
    """Synthetic data (``per_client`` images per client, IID) and the flora YAML of the run.

    ``spec["arch"]`` ``tiny`` (default) trains the offline tiny CLIP; ``vit-b-32`` a random-init
    CLIP with ViT-B/32 shapes, saved once in ``folder/model`` for every process to load.
    """
    import yaml

    from flora_lightning.bench.workload import caption_words, save_clip, synthetic_datamodule

    n = spec["clients"]
    data = synthetic_datamodule(
        folder / "data", clients=n, per_client=spec["per_client"], test_samples=16,
        batch_size=spec["per_client"], num_classes=spec["num_classes"], seed=spec["seed"],
    )  # fmt: skip
    # Loading once converts the parquet files into the datasets cache (Arrow), as a real
    # dataset's first load does: the measured run then maps that cache instead of converting.
    data.setup()
    trainer = {
        "rounds": spec["rounds"],
        "max_local_steps": 1,
        "accelerator": "cpu",
        "default_root_dir": str(folder / "run"),
        "progress": False,
        "seed": spec["seed"],
        "parallel_clients": spec.get("parallel_clients", 1),
    }
    if spec.get("store") == "disk":
        trainer["client_state_dir"] = str(folder / "client_states")
    model = "flora-offline/tiny-clip"
    if spec.get("arch", "tiny") != "tiny":
        model = save_clip(spec["arch"], folder / "model", caption_words(spec["num_classes"]))
    config = {
        "model": {
            "class_path": "flora_lightning.methods.FLoRA",
            "init_args": {"name_or_path": model},
        },
        "data": {
            "dataset": "parquet",
            "data_files": data.data_files,
            "image_column": "img",
            "test_split": "test",
            "template": data.template,
            "batch_size": spec["per_client"],
            "eval_batch_size": 16,
            "partition": {  # equal random shares: per_client rows each (see workload)
                "kind": "iid",
                "iid_rule": "random_chunks",
                "num_clients": n,
                "min_samples": 1,
                "seed": spec["seed"],
            },
        },
        "trainer": trainer,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_loop(spec: dict, config: Path) -> dict:
    """The in-process loop: round times from its summary, store time, peak RSS, state bytes."""
    from flora_lightning.bench.client_memory import kept_state
    from flora_lightning.callbacks.base import Callback
    from flora_lightning.callbacks.memory import PeakMemoryMeter, status_kib
    from flora_lightning.flower.app_config import FlowerRunConfig, build_components

    parts = build_components(FlowerRunConfig(config=str(config)))
    loop, n = parts.loop, spec["clients"]
    timed: dict[str, TimedStates] = {}
    ends: dict[int, float] = {}

    class Probe(Callback):
        def on_fit_start(self, loop, model) -> None:  # after launch: the trainer exists
            timed["store"] = loop.local_trainer.state_store = TimedStates(
                loop.local_trainer.state_store
            )

        def on_round_start(self, loop, round, clients) -> None:
            timed["store"].seconds = 0.0

        def on_round_end(self, loop, round, record) -> None:
            if round > 0:
                ends[round] = timed["store"].seconds

    loop.callbacks.append(Probe())
    meter = PeakMemoryMeter("cpu")
    meter.start()
    t0 = time.perf_counter()
    summary = loop.fit(parts.model, parts.data)
    wall = time.perf_counter() - t0
    memory = meter.stop()
    # The RSS at the end by kind: anonymous (heap: what the process allocated) and file-backed
    # (mapped files: the dataset's memory-mapped Arrow pages read, libraries' code).
    anon, file = status_kib("RssAnon"), status_kib("RssFile")
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    store = [ends[r["round"]] for r in rounds]
    fits = [r["train_seconds"] - s for r, s in zip(rounds, store, strict=True)]
    overhead = [r["seconds"] - f - r["eval_seconds"] for r, f in zip(rounds, fits, strict=True)]
    kept = loop.local_trainer.state_store.inner
    per_client = kept_state(loop, parts.data)
    return {
        "seconds_per_client_round": sum(r["seconds"] for r in rounds) / (n * len(rounds)),
        "fit_seconds_per_client": sum(fits) / (n * len(rounds)),
        "store_seconds_per_client": sum(store) / (n * len(rounds)),
        "overhead_ms_per_client": 1000 * sum(overhead) / (n * len(rounds)),
        "round_seconds": [r["seconds"] for r in rounds],
        "wall_seconds": wall,
        "peak_rss_mb": memory.peak_bytes / 2**20,
        "start_rss_mb": memory.start_bytes / 2**20,
        "memory_measure": memory.measure,
        "end_rss_anon_mb": None if anon is None else anon / 2**20,
        "end_rss_file_mb": None if file is None else file / 2**20,
        "state_bytes_per_client": kept.nbytes() / n,
        "state_bytes_in_ram_per_client": 0.0 if spec["store"] == "disk" else kept.nbytes() / n,
        "feature_caching_seconds": summary["feature_caching_seconds"],
        "kept_bytes_per_client": {k: v["bytes"] / n for k, v in per_client.items()},
        "kept_objects_per_client": {k: v["objects"] / n for k, v in per_client.items()},
    }


def run_flower(spec: dict, config: Path) -> dict:
    """Flower's simulation engine (Ray, one virtual SuperNode per client) on the same config."""
    from flora_lightning.flower.simulation import simulate

    out = config.parent / "flower_run"
    t0 = time.perf_counter()
    simulate(str(config), out_dir=str(out), num_cpus_per_client=spec["cpus_per_client"])
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    n = spec["clients"]
    return {
        "seconds_per_client_round": sum(r["seconds"] for r in rounds) / (n * len(rounds)),
        "round_seconds": [r["seconds"] for r in rounds],
        "wall_seconds": wall,
        "final_test_acc": summary["final_test_acc"],
    }


def prepare(spec: dict) -> Path:
    """The point's data and YAML in ``spec["work_dir"]`` (its own process in the scan, so the
    measured process never held the data generation's memory); returns the YAML."""
    folder = Path(spec["work_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(spec, folder)


def measure(spec: dict) -> dict:
    """Run one scan point (prepared first unless it was); returns ``spec`` with the
    measurements added."""
    config = Path(spec["work_dir"]) / "config.yaml"
    if not config.exists():
        config = prepare(spec)
    runner = run_flower if spec["runtime"] == "flower" else run_loop
    return {**spec, **runner(spec, config)}


if __name__ == "__main__":
    spec = json.loads(sys.argv[sys.argv.index("--spec") + 1])
    if "--prepare" in sys.argv:
        prepare(spec)
    else:
        Path(spec["result"]).write_text(json.dumps(measure(spec), indent=2) + "\n")
