"""The federated run in one process: setup, the round engine both runtimes share, the loop that
trains sampled clients one after another, the local trainer, availability, per-client ranks and
evaluation (global and per client)."""
