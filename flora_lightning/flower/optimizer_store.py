"""``OptimizerStore``: a node's client optimizer state between the rounds it trains.

The in-process loop keeps each client's Adam state across rounds (the paper's protocol); on
Flower that state never leaves the node. Where it is kept:

- ``node_config["state-dir"]`` set (``--node-config '... state-dir="/path"'``): on disk, one
  safetensors file per round the client trained,
  ``<state-dir>/run-<fingerprint>/partition-<id>/round_XXX.safetensors`` (written atomically,
  recorded with its sha256 in the folder's ``manifest.json``, the last ``keep`` kept). It
  survives a SuperNode restart and a new ``flwr run`` (a resumed ServerApp): a fit of round
  ``r`` loads the newest file of a round before ``r``, so a ServerApp resumed from round ``k``
  continues from the state the client had after round ``k``, exactly as an uninterrupted run
  (the state of a round the server never completed is never used, and is deleted when the
  client trains that round again).

  The fingerprint (:func:`run_fingerprint`) hashes what identifies the run in its resolved
  config: the fields a resume may not change (:data:`~flora_lightning.rundir.resume_check.FIXED`:
  method, adapter, data, partition, seed, privacy) and the server's run directory
  (``trainer.default_root_dir``). A resumed ServerApp keeps it; another run, or the same
  config into another run directory, gets its own folder, so files an earlier run left are
  neither loaded nor let pruning delete the file just written. A file in the folder that its
  manifest does not list, or that fails its checksum, is refused with an error naming it.
- no ``state-dir``: in the node's ``context.state`` (memory, this run only). After a SuperNode
  restart or in a new run (a resumed ServerApp) the client's optimizer starts afresh, with a
  logged warning; the run then differs from an uninterrupted one.

A client whose fit diverged has no state afterwards (the trainer drops it): an empty file (or
no record) is stored, so its next fit starts a fresh optimizer, as in ``flora fit``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context

from flora_lightning.flower.arrays import to_state
from flora_lightning.rundir.checkpoint import (
    flatten_optimizer_states,
    load_state,
    save_state,
    unflatten_optimizer_states,
    write_manifest,
)
from flora_lightning.rundir.integrity import CorruptCheckpointError, read_manifest
from flora_lightning.rundir.resume_check import fixed_values

log = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"
"""``node_config`` key of the folder where the node keeps its clients' optimizer states."""
OPTIMIZER_STATE_KEY = "flora-optimizer"
"""``context.state`` key of the client's Adam state (an ArrayRecord), without ``state-dir``."""
ROUND_KEY = "flora-optimizer-round"
"""``context.state`` key of the round that state was saved after (a ConfigRecord)."""
_FILE = re.compile(r"round_(\d+)\.safetensors")


def run_fingerprint(config_yaml: str) -> str:
    """16 hex digits naming the run of ``config_yaml`` (its resolved config): the fields a
    resume keeps, and ``trainer.default_root_dir``."""
    config = yaml.safe_load(config_yaml) or {}
    identity = fixed_values(config)
    identity["trainer.default_root_dir"] = (config.get("trainer") or {}).get("default_root_dir")
    encoded = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


class OptimizerStore:
    """Load before and save after a client's fit, on disk or in ``context.state``.

    Args:
        context: the node's Flower context (its ``node_config`` and ``state``).
        partition: the client (partition id) this node plays.
        keep: files kept per partition (the server may resume from an earlier round than
            the last one the client trained: keep ``resume_every_n_rounds + 1``).
        config_yaml: the run's resolved config (:func:`run_fingerprint` names its folder).
    """

    def __init__(self, context: Context, partition: int, keep: int, config_yaml: str) -> None:
        self.context = context
        self.partition = partition
        self.keep = max(1, keep)
        folder = context.node_config.get(STATE_DIR_KEY)
        self.folder = (
            Path(str(folder)) / f"run-{run_fingerprint(config_yaml)}" / f"partition-{partition}"
            if folder
            else None
        )

    def load(self, round_: int) -> dict[int, dict]:
        """The client's optimizer states (``{partition: state}``) saved after the newest round
        before ``round_``; ``{}`` when there is none (a warning after round 1)."""
        if self.folder is not None:
            earlier = [(r, path) for r, path in self._files() if r < round_]
            if earlier:
                return unflatten_optimizer_states(load_state(earlier[-1][1]))
        else:
            state = self.context.state
            saved = state.config_records.get(ROUND_KEY)
            if OPTIMIZER_STATE_KEY in state.array_records and saved and saved["round"] < round_:
                record = state.array_records[OPTIMIZER_STATE_KEY]
                return unflatten_optimizer_states(to_state(record))
        if round_ > 1:
            old = self.folder.parent.parent / self.folder.name if self.folder else None
            if old is not None and any(_FILE.fullmatch(p.name) for p in old.glob("round_*")):
                log.warning(
                    "partition %d: %s holds optimizer states in the layout before run "
                    "fingerprints; they are not loaded (nothing says which run wrote them). If "
                    "they are this run's, move them into %s.",
                    self.partition,
                    old,
                    self.folder,
                )
            where = (
                f"in {self.folder}"
                if self.folder is not None
                else "(no node_config state-dir: states live in this SuperNode's memory for one "
                "run only; a restarted SuperNode or a resumed ServerApp loses them)"
            )
            log.warning(
                "partition %d, round %d: no optimizer state from an earlier round %s; its "
                "optimizer starts afresh (expected only if it never trained before).",
                self.partition,
                round_,
                where,
            )
        return {}

    def save(self, round_: int, states: dict[int, dict]) -> None:
        """Keep the client's state after its fit of ``round_`` (none: it starts afresh next)."""
        mine = {self.partition: states[self.partition]} if self.partition in states else {}
        flat = flatten_optimizer_states(mine)
        if self.folder is not None:
            files = self._files()
            path = self.folder / f"round_{round_:03d}.safetensors"
            save_state(flat, path, metadata={"round": str(round_)})
            write_manifest(self.folder, [path.name])
            # rounds after this one: from before the server resumed at an earlier round
            stale = [old for r, old in files if r > round_]
            kept = [(r, old) for r, old in files if r < round_] + [(round_, path)]
            removed = stale + [old for _, old in kept[: -self.keep]]
            for old in removed:
                old.unlink(missing_ok=True)
            if removed:
                write_manifest(self.folder, [])  # drops the removed files' entries
            return
        state = self.context.state
        if flat:
            state.array_records[OPTIMIZER_STATE_KEY] = ArrayRecord(flat)
            state.config_records[ROUND_KEY] = ConfigRecord({"round": round_})
        else:  # diverged: its NaN moments must not come back
            for records, key in (
                (state.array_records, OPTIMIZER_STATE_KEY),
                (state.config_records, ROUND_KEY),
            ):
                if key in records:
                    del records[key]

    def _files(self) -> list[tuple[int, Path]]:
        """``(round, path)`` of the saved files, oldest first (by round number).

        Raises:
            CorruptCheckpointError: a state file the folder's manifest does not list (not
                written by this store), naming it.
        """
        if not self.folder.is_dir():
            return []
        found = [(_FILE.fullmatch(p.name), p) for p in self.folder.iterdir()]
        files = sorted((int(m.group(1)), p) for m, p in found if m)
        listed = read_manifest(self.folder) or {}
        for _, path in files:
            if path.name not in listed:
                raise CorruptCheckpointError(
                    f"{path}: an optimizer state file this node's store did not write (not in "
                    f"{self.folder / 'manifest.json'}): the folder belongs to this run alone; "
                    "remove the file, or give the node another state-dir."
                )
        return files
