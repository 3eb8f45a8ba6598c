"""The Flower run config (``[tool.flwr.app.config]``) and how it becomes model, data and loop.

Both apps read the same YAML as ``flora fit``, so a Flower run and an in-process run of one
config train the same model on the same partitions with the same seeds. The run config only
points at that YAML and overrides a few loop settings::

    config = "configs/quickstart.yaml"   # the flora YAML (relative: to the working directory,
                                         # then to the repository of this package)
    num-server-rounds = 0                # rounds; 0 keeps trainer.rounds of the YAML
    out-dir = ""                         # run directory; "" keeps trainer.default_root_dir
    min-clients = 0                      # fewest accepted updates per round; 0 keeps the YAML's
    overrides = ""                       # extra flora CLI arguments, e.g. "--trainer.max_local_steps 2"
    node-wait-seconds = 60               # a round waits at most this long for missing nodes
    resume = false                       # continue the run in out-dir (--trainer.resume true)
    dp-clipping = "server"               # privacy.level client: Flower clips on the server or
                                         # on each node (client mods); flora_lightning.flower.dp
    one-partition-per-node = false       # true on deployment nodes: a ClientApp process then
                                         # frees its image encoder after caching its partition
    node-data = false                    # true: each node reads only its own data-path, the
                                         # server opens no training data (flower.node_data)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from flora_lightning.finite_values import check_finite_fields
from flora_lightning.stages import RunParts, build_run, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Where ``configs/`` lives in a source checkout (editable install)."""


@dataclass(frozen=True)
class FlowerRunConfig:
    """The run-config keys both apps understand (Flower spells them with dashes)."""

    config: str = "configs/quickstart.yaml"
    """Path of the flora YAML config (the one ``flora fit --config`` takes); a node whose node
    config pins its own ``config`` reads that one instead (:mod:`~flora_lightning.flower.
    node_policy`)."""
    num_server_rounds: int = 0
    """Federated rounds; 0 keeps ``trainer.rounds`` of the YAML."""
    out_dir: str = ""
    """Run directory of the ServerApp's outputs; empty keeps ``trainer.default_root_dir``."""
    min_clients: int = 0
    """Fewest accepted client updates for a round to count; 0 keeps the YAML's strategy value."""
    overrides: str = ""
    """Extra ``flora fit`` arguments applied after the YAML (shell-quoted string)."""
    node_wait_seconds: float = 60.0
    """How long a round waits, at most, for the SuperNodes of its partitions to (re)connect;
    after that it trains those connected and records the others as "node not connected"."""
    resume: bool = False
    """Continue the run in the run directory from its last complete round (as
    ``--trainer.resume true``, which ``overrides`` may also give)."""
    dp_clipping: str = "server"
    """With ``privacy.level client``: where Flower's DP wrapper clips each update, ``server``
    (``DifferentialPrivacyServerSide*Clipping``) or ``client`` (``DifferentialPrivacyClient
    Side*Clipping`` + the clipping mod on every node); see :mod:`flora_lightning.flower.dp`."""
    partition_nodes: str = ""
    """``"PARTITION:NODE_ID,..."``: each partition may be trained only by that node id (with
    SuperNode authentication a node's id is fixed by its registered public key, so this binds
    each key to its partition); a node claiming another partition is refused. Empty: the
    first node to claim a partition keeps it (docs/flower.md)."""
    node_data: bool = False
    """True where every data owner keeps its data: each SuperNode trains on its own
    ``--node-config data-path`` (or, on the simulation engine with ``data.partition.kind:
    folders``, on ``client_dirs[partition-id]`` only) and the ServerApp opens no training data
    (:mod:`flora_lightning.flower.node_data`, :mod:`flora_lightning.flower.server_data`)."""
    one_partition_per_node: bool = False
    """True where each ClientApp process trains one partition (a deployment's SuperNodes): it
    then applies the YAML's ``trainer.release_image_encoder`` after caching its partition's
    features (~350 MB less per node at ViT-B/32). False (simulation, where one worker process
    serves many virtual nodes): the image encoder stays to encode the next partition."""

    def __post_init__(self) -> None:
        self.bound_nodes()  # a malformed partition-nodes is refused now
        for key in ("num_server_rounds", "min_clients", "node_wait_seconds"):
            value = getattr(self, key)  # a quoted "60" or "nan" is a string in TOML
            kind = (int, float) if key == "node_wait_seconds" else int
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(
                    f"{key.replace('_', '-')} must be a{' whole' if kind is int else ''} number, "
                    f"unquoted (got {value!r})."
                )
        check_finite_fields(self, lambda field: field.replace("_", "-"))
        if self.num_server_rounds < 0:
            raise ValueError(f"num-server-rounds must be >= 0 (got {self.num_server_rounds}).")
        if self.min_clients < 0:
            raise ValueError(f"min-clients must be >= 0 (got {self.min_clients}).")
        if not self.node_wait_seconds >= 0:
            raise ValueError(
                f"node-wait-seconds must be >= 0 (got {self.node_wait_seconds}); 0 does not wait."
            )
        if self.dp_clipping not in ("server", "client"):
            raise ValueError(
                f"dp-clipping must be 'server' or 'client' (got {self.dp_clipping!r})."
            )
        for key in (
            "resume",
            "one_partition_per_node",
            "node_data",
        ):  # a quoted "false" would be truthy
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"{key.replace('_', '-')} must be true or false, unquoted (got "
                    f"{getattr(self, key)!r})."
                )

    @classmethod
    def from_run_config(cls, run_config: dict, defaults: dict | None = None) -> FlowerRunConfig:
        """Merge Flower's ``context.run_config`` over ``defaults`` (both dash- or underscore-keyed)."""
        merged = {}
        for source in (defaults or {}, run_config):
            for key, value in source.items():
                merged[key.replace("-", "_")] = value
        known = set(cls.__dataclass_fields__)
        unknown = sorted(k.replace("_", "-") for k in set(merged) - known)
        if unknown:
            raise ValueError(
                f"unknown Flower run-config key(s) {unknown}; known: "
                f"{sorted(k.replace('_', '-') for k in known)}."
            )
        return cls(**merged)

    def bound_nodes(self) -> dict[int, int]:
        """``partition-nodes`` as partition -> node id (empty: no binding)."""
        bound: dict[int, int] = {}
        if not isinstance(self.partition_nodes, str):
            raise ValueError(f"partition-nodes must be a string (got {self.partition_nodes!r}).")
        for pair in filter(None, (p.strip() for p in self.partition_nodes.split(","))):
            partition, _, node = pair.partition(":")
            if not (partition.strip().isdigit() and node.strip().isdigit()):
                raise ValueError(
                    f"partition-nodes: {pair!r} is not PARTITION:NODE_ID (e.g. "
                    '"0:5123412,1:9870012", the node ids flwr supernode register printed).'
                )
            if int(partition) in bound or int(node) in bound.values():
                raise ValueError(f"partition-nodes names partition or node of {pair!r} twice.")
            bound[int(partition)] = int(node)
        return bound

    def config_path(self) -> Path:
        path = Path(self.config).expanduser()
        for candidate in (path, REPO_ROOT / path) if not path.is_absolute() else (path,):
            if candidate.is_file():
                return candidate.resolve()
        raise FileNotFoundError(
            f"Flower run-config config={self.config!r} not found (looked in the working "
            f"directory and in {REPO_ROOT}); pass an absolute path with "
            "--run-config 'config=\"/abs/path.yaml\"'."
        )

    def cli_args(self, run_dir: str | None = None) -> list[str]:
        """The ``flora fit`` arguments this run config stands for."""
        args = ["--config", str(self.config_path())]
        if self.num_server_rounds:
            args += ["--trainer.rounds", str(self.num_server_rounds)]
        out_dir = run_dir if run_dir is not None else self.out_dir
        if out_dir:
            args += ["--trainer.default_root_dir", out_dir]
        args += ["--trainer.progress", "false"]
        if self.resume:
            args += ["--trainer.resume", "true"]
        args += shlex.split(self.overrides)
        return args


@dataclass
class Components(RunParts):
    """What one app builds from the YAML (:class:`~flora_lightning.stages.RunParts`: the
    method, the data, the loop and the config dump) and the round's fewest updates."""

    min_clients: int = 1
    """Fewest accepted updates per round: the run config's ``min-clients``, else the YAML's
    ``trainer.strategy.min_clients``."""


def build_components(run: FlowerRunConfig, run_dir: str | None = None) -> Components:
    """Parse and build exactly as ``flora fit`` does (:func:`~flora_lightning.stages.build_run`;
    nothing is set up yet)."""
    parser = stage_parser("fit")
    parts = build_run(parser, parser.parse_args(run.cli_args(run_dir)))
    return Components(**vars(parts), min_clients=run.min_clients or parts.loop.strategy.min_clients)
