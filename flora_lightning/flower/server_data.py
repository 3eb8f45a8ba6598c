"""``ServerSideData``: the ServerApp's data when every node keeps its own (run config ``node-data``).

The server of such a federation holds no training data. It needs the class names and the
caption template (from the run's YAML), the number of clients (``data.partition.num_clients``:
the seeded sampler draws client ids from it) and, for global evaluation, a test set of its own
(``data.test_dataset``, else the test split of ``data.dataset``:
:meth:`FederatedDataModule.setup_server <flora_lightning.data.datamodule.FederatedDataModule.
setup_server>`). Everything else it learns from the nodes: sample counts from their updates
(FedAvg weights), label counts only from nodes whose operator set ``share-label-counts=true``
(:attr:`ServerSideData.shared`; the label table shows what was shared and marks the rest).

The wrapper stands where the loop expects the datamodule: ``setup`` opens the test set only;
any other attribute is the wrapped datamodule's (whose client rows stay empty).
"""

from __future__ import annotations

NOT_SHARED = "not shared (the node's share-label-counts is false)"
"""What the label table says of a node that keeps its label counts."""


class ServerSideData:
    """The YAML's datamodule, opened as a server with no training data.

    Args:
        data: the run's :class:`~flora_lightning.data.datamodule.FederatedDataModule`.
    """

    def __init__(self, data) -> None:
        self._data = data
        self.shared: dict[int, tuple[int, list[int]]] = {}
        """Client -> (training samples, label counts) as its node shared them."""

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def setup(self, stage: str | None = None) -> None:
        """Open the server's test set (and nothing of the clients')."""
        self._data.setup_server()

    @property
    def num_clients(self) -> int:
        return self._data.partition.num_clients

    def num_samples(self, client_id: int) -> int:
        """A client's training samples, where its node shared them.

        Raises:
            ValueError: the node keeps them (server-side code that needs them is refused).
        """
        if client_id not in self.shared:
            raise ValueError(
                f"client {client_id}'s sample count is known only to its node (node-data); "
                "its node shares it with --node-config share-label-counts=true."
            )
        return self.shared[client_id][0]

    def label_table(self) -> str:
        """Per client: the label counts its node shared, or that it did not."""
        names = list(self._data.class_names or [])
        width = max([len("client")] + [len(n) for n in names])
        lines = ["client  samples  " + "  ".join(n.rjust(width) for n in names)]
        for client in range(self.num_clients):
            samples, counts = self.shared.get(client, (0, None))
            if counts is not None and len(counts) != len(names):
                lines.append(f"{client:<6}  its shared counts are not one per class; ignored")
            elif counts is not None:
                cells = "  ".join(str(c).rjust(width) for c in counts)
                lines.append(f"{client:<6}  {samples:>7}  {cells}")
            else:
                lines.append(f"{client:<6}  {NOT_SHARED}")
        return "\n".join(lines)
