"""``simulate``: a flora config on Flower's simulation runtime, from Python.

    from flora_lightning.flower.simulation import simulate
    simulate("configs/quickstart.yaml", out_dir="runs/flower-sim", num_server_rounds=2)

One virtual SuperNode per client partition (``data.partition.num_clients`` of the YAML);
Flower gives each its ``partition-id``/``num-partitions``.
"""

from __future__ import annotations

from flora_lightning.flower.app_config import FlowerRunConfig, build_components
from flora_lightning.flower.client_app import make_client_app
from flora_lightning.flower.server_app import make_server_app


def simulate(
    config: str,
    out_dir: str = "",
    num_server_rounds: int = 0,
    min_clients: int = 0,
    overrides: str = "",
    num_cpus_per_client: float = 1.0,
    node_wait_seconds: float = 60.0,
    resume: bool = False,
    dp_clipping: str = "server",
) -> None:
    """Run ``config`` with ``flwr.simulation.run_simulation`` (Ray backend); outputs in out_dir.
    The arguments are the run-config keys (:class:`~flora_lightning.flower.app_config.
    FlowerRunConfig`), e.g. ``dp_clipping="client"`` clips on the virtual nodes."""
    from flwr.simulation import run_simulation

    defaults = {
        "config": config,
        "out-dir": out_dir,
        "num-server-rounds": num_server_rounds,
        "min-clients": min_clients,
        "overrides": overrides,
        "node-wait-seconds": node_wait_seconds,
        "resume": resume,
        "dp-clipping": dp_clipping,
    }
    num_clients = build_components(FlowerRunConfig.from_run_config(defaults)).data.num_clients
    run_simulation(
        server_app=make_server_app(defaults),
        client_app=make_client_app(defaults),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}},
    )
