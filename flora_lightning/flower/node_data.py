"""Which client a Flower node plays and where its training data comes from.

Two ways, chosen per run by the run config's ``node-data`` (:class:`~flora_lightning.flower.
app_config.FlowerRunConfig`):

- ``node-data = false`` (simulated partitions, the default): the node plays client
  ``partition-id`` of its ``--node-config`` and trains that seeded partition of the YAML's
  data set, as ``flora fit`` would (every node can read the whole data set).
- ``node-data = true`` (every data owner keeps its data): a deployed SuperNode is started with
  ``--node-config 'data-path="/site/images" client-id=0'`` (and optionally
  ``test-path="/site/test"``, ``share-label-counts=true``) and reads that path only: an
  imagefolder directory, parquet files or ``hub:ID[:SPLIT]``
  (:mod:`flora_lightning.data.source_spec`), labelled by class name in the YAML's
  ``data.class_names`` order. ``client-id`` is the node's index in the federation (its seeds,
  its place in the round records; the entry of ``data.partition.client_dirs`` the in-process
  twin gives it). A node has a ``partition-id`` or a ``data-path``, not both. On Flower's
  simulation engine (where nodes have only a ``partition-id``) and a YAML with
  ``data.partition.kind: folders``, virtual node ``k`` reads ``client_dirs[k]`` (and
  ``client_test_dirs[k]``) and nothing else.

What a node reveals is its operator's choice: its label counts leave it only with
``share-label-counts=true`` (default false); its sample count travels with every update
(FedAvg weighs by it).
"""

from __future__ import annotations

from dataclasses import dataclass

PARTITION_ID = "partition-id"
DATA_PATH = "data-path"
TEST_PATH = "test-path"
CLIENT_ID = "client-id"
SHARE_LABEL_COUNTS = "share-label-counts"
NODE_KEYS = (PARTITION_ID, "num-partitions", DATA_PATH, TEST_PATH, CLIENT_ID, SHARE_LABEL_COUNTS)
"""The ``--node-config`` keys flora reads."""


@dataclass(frozen=True)
class NodeData:
    """What a node trains on.

    Attributes:
        client: the client id the node plays (seeds, records).
        data_path: its own data (``node-data``), or None: partition ``client`` of the YAML's data.
        test_path: its own local test set (``test-path``), or None.
        share_label_counts: whether its label counts may leave the node.
        fields: what the node's messages call its data and test paths.
    """

    client: int
    data_path: str | None = None
    test_path: str | None = None
    share_label_counts: bool = False
    fields: tuple[str, str] = (DATA_PATH, TEST_PATH)


def _flag(node_config: dict, key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ValueError(f"node_config {key} must be true or false (got {value!r}).")


def _index(node_config: dict, key: str, num_clients: int) -> int:
    value = node_config[key]
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = None
    if index is None or str(index) != str(value).strip() or not 0 <= index < num_clients:
        raise ValueError(
            f"node_config {key}={value!r} must be an integer in [0, {num_clients}) "
            f"(data.partition.num_clients={num_clients})."
        )
    return index


def node_data(node_config: dict, node_data_run: bool, partition) -> NodeData:
    """Resolve a node's client and data from its ``node_config``.

    Args:
        node_config: Flower's ``context.node_config``.
        node_data_run: the run config's ``node-data``.
        partition: the YAML's ``data.partition`` (``num_clients``, ``kind``, ``client_dirs``).

    Raises:
        ValueError: a missing, contradictory or out-of-range key, naming it and the fix.
    """
    num_clients = partition.num_clients
    share = _flag(node_config, SHARE_LABEL_COUNTS)
    own = node_config.get(DATA_PATH)
    if own is not None and not node_data_run:
        raise ValueError(
            f"node_config {DATA_PATH}={own!r} is read only when the run config has "
            "node-data = true (the server then holds no training data); set it, or start the "
            f"node with {PARTITION_ID} for a simulated partition."
        )
    if own is not None:
        if PARTITION_ID in node_config:
            raise ValueError(
                f"node_config has both {PARTITION_ID} and {DATA_PATH}: a node trains a "
                f"simulated partition or its own data, not both; drop one of them."
            )
        if CLIENT_ID not in node_config:
            raise ValueError(
                f"node_config {DATA_PATH} needs {CLIENT_ID}: this node's index in the "
                f"federation (0 to {num_clients - 1}), e.g. --node-config "
                f"'{DATA_PATH}=\"{own}\" {CLIENT_ID}=0'."
            )
        test = node_config.get(TEST_PATH)
        return NodeData(_index(node_config, CLIENT_ID, num_clients), str(own),
                        None if test is None else str(test), share)  # fmt: skip
    if PARTITION_ID not in node_config:
        raise ValueError(
            f"node_config has no {PARTITION_ID}"
            + (f" and no {DATA_PATH}" if node_data_run else "")
            + "; start the SuperNode with --node-config "
            + (
                f"'{DATA_PATH}=\"/site/images\" {CLIENT_ID}=0' (its own data)"
                if node_data_run
                else f'"{PARTITION_ID}=0 num-partitions=N" (simulation sets it)'
            )
            + "."
        )
    declared = int(node_config.get("num-partitions", num_clients))
    if declared != num_clients:
        raise ValueError(
            f"node_config num-partitions={declared} does not fit the config's "
            f"data.partition.num_clients={num_clients}."
        )
    client = _index(node_config, PARTITION_ID, num_clients)
    if not node_data_run:
        return NodeData(client, share_label_counts=share)
    if partition.kind != "folders":
        raise ValueError(
            f"run config node-data = true: node {client} has no {DATA_PATH}; start it with "
            f"--node-config '{DATA_PATH}=\"/site/images\" {CLIENT_ID}={client}', or (on the "
            "simulation engine) use data.partition.kind: folders with client_dirs."
        )
    tests = partition.client_test_dirs
    fields = (f"data.partition.client_dirs[{client}]", f"data.partition.client_test_dirs[{client}]")
    return NodeData(client, partition.client_dirs[client],
                    None if tests is None else tests[client], share, fields)  # fmt: skip
