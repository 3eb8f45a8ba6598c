"""Run flora's methods on Flower (``pip install 'flora-lightning[flower]'``).

- :mod:`~flora_lightning.flower.server_app`: the ``ServerApp`` (rounds, aggregation, outputs);
- :mod:`~flora_lightning.flower.client_app`: the ``ClientApp`` (one client's local fit);
- :mod:`~flora_lightning.flower.server_strategy`: ``FloraFedAvg``, Flower's FedAvg with flora's
  aggregation;
- :mod:`~flora_lightning.flower.nodes`: ``NodeRoster``, which node holds which partition and a
  bounded wait for missing nodes;
- :mod:`~flora_lightning.flower.optimizer_store`: ``OptimizerStore``, a node's client optimizer
  state between rounds (memory, or files under ``node_config["state-dir"]``);
- :mod:`~flora_lightning.flower.app_config`: the run-config keys and how they become the
  YAML-configured model, data and loop;
- :mod:`~flora_lightning.flower.simulation`: ``simulate`` (Flower's simulation runtime from
  Python).

The Flower app folder ``flower_app/`` (``flwr run flower_app``) points at these modules.
"""
