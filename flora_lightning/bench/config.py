"""What ``flora bench`` measures and at which scale, and the targets it checks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from flora_lightning.finite_values import check_finite_fields
from flora_lightning.methods import METHODS

UNCACHED = ("FLoRA",)
"""Methods also measured as ``<name>-uncached``: the vision tower runs every step (caching off)."""


def variants() -> tuple[str, ...]:
    """Every method of :data:`flora_lightning.methods.METHODS` by class name, in its order, each
    followed by its ``-uncached`` variant when listed in :data:`UNCACHED`."""
    names = [cls.__name__ for cls in METHODS.values()]
    return tuple(v for n in names for v in (n, f"{n}-uncached")[: 2 if n in UNCACHED else 1])


VARIANTS = variants()
"""Benchmarked methods (derived from ``METHODS`` when this module is imported)."""
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
TEMPLATE = "a photo of a {}."
TARGETS = {"round_speedup": 100.0, "memory_reduction": 5.0, "bytes_reduction": 6000.0}
"""What FLoRA (cached) is checked against, vs FedFFT (x times); loop overhead under 5%."""
LOOP_OVERHEAD_TARGET = 0.05


@dataclass
class BenchConfig:
    """What to benchmark and at which scale (defaults: the paper's CIFAR-10 setting)."""

    methods: list[str] = field(default_factory=lambda: list(variants()))
    """Methods to measure (default: every method in ``METHODS`` plus FLoRA-uncached)."""
    rounds: int = 50
    """Rounds the one-time feature caching is amortised over (paper: 50)."""
    client_samples: int = 5000
    """Training samples per client (CIFAR-10 over 10 clients: 5000)."""
    batch_size: int = 128
    """Local batch size (paper: 128)."""
    num_classes: int = 10
    """Classes of the task (CIFAR-10: 10)."""
    input_size: int = 32
    """Side of the synthetic RGB input images before CLIP preprocessing (CIFAR: 32)."""
    steps: int = 2
    """Timed local steps per method (the median is used)."""
    warmup: int = 1
    """Untimed local steps before the timed ones."""
    min_timed_seconds: float = 5.0
    """Fast methods keep timing steps (at most 100) until this many seconds were timed."""
    encode_samples: int | None = None
    """Images encoded (after one untimed warm-up batch) to time feature caching (default: 4
    batches)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where to train."""
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    """Fabric precision (paper: fp32)."""
    compile: Literal["off", "on", "ab"] = "off"
    """``trainer.compile`` for every method: off, on, or ab (each method measured eager and then
    compiled, side by side in one run; on CUDA the compiled arm also captures CUDA graphs as
    ``--cuda_graphs`` says, the eager arm never)."""
    cuda_graphs: Literal["auto", "off"] = "auto"
    """``trainer.cuda_graphs``: capture the local step in CUDA graphs on ``--device cuda``
    (auto) or never (off); CPU runs are eager unless compiled."""
    results: str | None = None
    """Also copy the report to a dated file in this folder (e.g. docs/results):
    ``<date>-bench-<arch>-<device>-<precision>[-<compile>][-<methods>].md`` and ``.json``
    (the methods named when not all were measured)."""
    preprocess: Literal["device", "processor"] = "device"
    """``data.preprocess``: CLIP's resize/crop/normalise in batches on the device, inside the
    timed encode and step (device), or per image on the CPU, timed as loading (processor).
    The synthetic images arrive decoded (uint8): decoding is not timed either way."""
    arch: Literal["vit-b-32", "tiny"] = "vit-b-32"
    """CLIP shapes: vit-b-32 (transformers.CLIPConfig defaults) or tiny (the offline tiny CLIP)."""
    loop_overhead: bool = True
    """Also run the real FederatedLoop for 2 rounds of cached FLoRA to measure its overhead."""
    dp_sgd: bool = False
    """Also time sample-level DP-SGD's step (noise 1.0, clip 1.0) next to the plain step, for
    every method DP-SGD supports (FLoRA also with lora.freeze_a); see bench/privacy.py."""
    out: str = "runs/bench"
    """Folder for bench.json, bench.md and the per-method worker results."""
    seed: int = 0
    """Seed for weights, LoRA init and synthetic images."""
    clients: list[int] | None = None
    """Scan these numbers of clients instead of measuring methods: the loop's seconds, overhead
    and memory per client (``flora_lightning.bench.clients``; ``--arch``: the model, its image
    features cached)."""
    parallel_clients: list[int] | None = None
    """Instead of measuring methods: one round of ``parallel_round_clients`` cached-FLoRA
    clients (``--arch`` shapes, ``--batch_size``) one after another and K at a time for each K
    here, side by side in one process (``flora_lightning.bench.parallel_clients``)."""
    parallel_round_clients: int = 10
    """With ``parallel_clients``: clients in the round."""
    flower_clients: list[int] = field(default_factory=list)
    """With ``clients``: also run these N (among ``clients``) on Flower's simulation engine."""
    client_rounds: int = 2
    """With ``clients``: rounds per run (from round 2 on, clients read their stored state)."""
    client_scan_parallel: int = 1
    """With ``clients``: the in-process loop trains K clients at a time
    (``trainer.parallel_clients``), to check that per-client cost and memory stay flat."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: f"bench --{field}")
        known = {v.lower(): v for v in variants()}
        unknown = [m for m in self.methods if m.lower() not in known]
        if not self.methods or unknown:
            raise ValueError(
                f"bench --methods: unknown or none ({unknown or self.methods}); choose from "
                f"{', '.join(known.values())}."
            )
        self.methods = list(dict.fromkeys(known[m.lower()] for m in self.methods))
        names = (
            "rounds", "client_samples", "batch_size", "num_classes", "steps", "client_rounds",
            "client_scan_parallel",
        )  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"bench --{name} must be >= 1 (got {getattr(self, name)}).")
        if self.warmup < 0:
            raise ValueError(f"bench --warmup must be >= 0 (got {self.warmup}).")
        if not self.min_timed_seconds >= 0:
            raise ValueError(
                f"bench --min_timed_seconds must be >= 0 (got {self.min_timed_seconds})."
            )
        if self.encode_samples is not None and self.encode_samples < 1:
            raise ValueError(f"bench --encode_samples must be >= 1 (got {self.encode_samples}).")
        if self.parallel_clients is not None and (
            not self.parallel_clients or any(k < 1 for k in self.parallel_clients)
        ):
            raise ValueError(
                f"bench --parallel_clients needs K values >= 1 (got {self.parallel_clients})."
            )
        if self.clients is not None or self.flower_clients:
            check_client_scan(self.clients or [], self.flower_clients)
        if self.precision == "16-mixed" and self.device != "cuda":
            raise ValueError("bench --precision 16-mixed needs --device cuda.")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.client_samples / self.batch_size)

    @property
    def full_steps_per_epoch(self) -> int:
        """Steps on a full batch; a last smaller one follows when the batch does not divide."""
        return self.client_samples // self.batch_size

    @property
    def encoded_images(self) -> int:
        """Images timed for feature caching: ``encode_samples`` (at least one batch), default 4
        batches."""
        return max(self.encode_samples or 4 * self.batch_size, self.batch_size)

    def to_argv(self) -> list[str]:
        """The ``flora bench`` options that rebuild this config (shown in the report)."""
        argv = ["--methods", f"[{','.join(self.methods)}]"]
        for key, value in asdict(self).items():
            if key != "methods" and value is not None:
                argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        return argv


def check_client_scan(clients: list[int], flower_clients: list[int]) -> None:
    """Refuse a bad ``--clients`` scan, naming the option."""
    if not clients or any(n < 1 for n in clients):
        raise ValueError(f"bench --clients needs numbers of clients >= 1 (got {clients}).")
    if any(n not in clients for n in flower_clients):
        raise ValueError(
            f"bench --flower_clients {flower_clients} must be among --clients {clients}."
        )
