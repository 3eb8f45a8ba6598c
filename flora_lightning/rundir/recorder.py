"""``RunRecorder``: everything a run leaves in its directory, written by one owner.

Both runtimes record through it (``flora fit`` and the Flower ServerApp), so their run
directories have one layout::

    run.lock                            held by the process writing the run (pid, host, since)
    config.yaml (config.resumed.yaml)   the resolved config, once setup succeeded
    label_table.txt                     samples per class per client
    tensorboard/                        scalars per round
    checkpoints/round_XXX.safetensors   the global communicated state after each round
    resume/                             global state, extra states, history (every n rounds)
    final/                              the exported model
    summary.json                        the run's summary; ``rounds`` holds one RoundRecord each

Files are written atomically (:mod:`flora_lightning.rundir.checkpoint`), so an interrupted run leaves
the last complete round loadable, and never through a symlink planted at their names. One process
at a time writes the directory (:mod:`flora_lightning.rundir.lock`): :meth:`RunRecorder.open`
takes its lock before the first file is written, :meth:`RunRecorder.finish` (or
:meth:`RunRecorder.close`, or the process's exit) gives it back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from flora_lightning.rundir.checkpoint import (
    CorruptCheckpointError,
    link_or_copy,
    load_state,
    save_state,
    verify_folder,
    write_folder,
    write_json,
    write_manifest,
    write_text,
)
from flora_lightning.rundir.integrity import MissingManifestError, newest_valid_folder, prev_folder
from flora_lightning.rundir.lock import RunDirLock
from flora_lightning.rundir.resume_check import check_resumable
from flora_lightning.rundir.round_record import RoundRecord, RoundTally
from flora_lightning.strategy import State, state_bytes

_CHECKPOINT = re.compile(r"round_(\d+)\.safetensors")


def checkpoint_rounds(folder: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of the per-round checkpoints in ``folder``, by round number (not by
    name: ``round_1000`` sorts before ``round_999`` as text)."""
    if not folder.is_dir():
        return []
    found = [(_CHECKPOINT.fullmatch(p.name), p) for p in folder.iterdir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def shard_file(name: str, shard: int) -> str:
    """File of shard ``shard`` of the resume state ``name``: ``optimizers.safetensors``,
    ``optimizers.1.safetensors``, ... (one file when the state is small)."""
    return f"{name}.safetensors" if shard == 0 else f"{name}.{shard}.safetensors"


class RunRecorder:
    """The run directory of one federated run.

    Args:
        run_dir: the run directory (``trainer.default_root_dir``).
        resume: continue the run found there.
        resume_every_n_rounds: write the resume state every n rounds and after the last.
        keep_last_checkpoints: keep only this many per-round checkpoints (None: all).
        rounds: the planned number of rounds (the last one always writes the resume state).
        resume_without_manifest: resume from a ``resume/`` folder that has no checksum
            manifest (written before manifests existed, or copied without it), unverified.
            False: such a folder is refused, since nothing says its files are whole.
    """

    def __init__(
        self,
        run_dir: str | Path,
        resume: bool = False,
        resume_every_n_rounds: int = 1,
        keep_last_checkpoints: int | None = None,
        rounds: int = 0,
        resume_without_manifest: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.resume_without_manifest = resume_without_manifest
        self.lock = RunDirLock(self.run_dir)
        """The run directory's lock, held from :meth:`open` to :meth:`finish`."""
        self.resume = resume
        self.resume_every_n_rounds = resume_every_n_rounds
        self.keep_last_checkpoints = keep_last_checkpoints
        self.rounds = rounds
        self.history: list[RoundRecord] = []
        self.callbacks: list = []
        """Contributors of extra round and summary fields (the loop's callbacks)."""
        self.caching_seconds = 0.0
        """Time spent caching image features (a summary field)."""
        self.client_stats = True
        """Write per-client statistics (training losses, label counts). False under DP unless
        ``privacy.log_client_stats``: they are computed from client data outside epsilon."""

    # ============================================================ opening
    def check(self, config_yaml: str | None) -> None:
        """Refuse a directory that holds a finished run, or a resume that changes the run."""
        if self.run_dir.is_file():
            raise NotADirectoryError(
                f"trainer.default_root_dir={self.run_dir} is a file; give a directory path."
            )
        if not self.resume and (self.run_dir / "summary.json").exists():
            raise FileExistsError(
                f"trainer.default_root_dir={self.run_dir} already holds a run; pass "
                "--trainer.resume true to continue it or choose another directory."
            )
        if self.resume and config_yaml is not None:
            check_resumable(self.run_dir, config_yaml)

    def tensorboard(self):
        """The run's TensorBoard logger (``run_dir/tensorboard``) for Fabric."""
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(root_dir=str(self.run_dir), name="tensorboard", version="")

    def open(self, config_yaml: str | None, label_table: str) -> None:
        """Create the directory and take its lock; write the config (once setup succeeded) and
        the label table (atomically, never through a symlink).

        Raises:
            RunDirLockedError: another process is writing the directory (naming it).
        """
        self.lock.acquire()
        try:
            self.check(config_yaml)  # again, now that no other process can change the folder
        except BaseException:
            self.lock.release()
            raise
        if config_yaml is not None:
            name = (
                "config.resumed.yaml" if (self.run_dir / "config.yaml").exists() else "config.yaml"
            )
            write_text(config_yaml, self.run_dir / name)
        write_text(self.shown_label_table(label_table) + "\n", self.run_dir / "label_table.txt")

    def close(self) -> None:
        """Give the run directory's lock back (also done by :meth:`finish`)."""
        self.lock.release()

    def shown_label_table(self, label_table: str) -> str:
        """``label_table``, or a line saying why it is withheld (:attr:`client_stats`)."""
        if self.client_stats:
            return label_table
        return (
            "withheld: per-client label counts are not covered by the run's differential "
            "privacy (set privacy.log_client_stats: true to write them)"
        )

    # ============================================================= rounds
    def record(self, fabric, loop, tally: RoundTally, metrics: dict[str, float]) -> RoundRecord:
        """The round's record from its tally and evaluation; callbacks' fields; TensorBoard."""
        last = self.history[-1] if self.history else None
        record = RoundRecord(
            round=tally.round,
            test_acc=metrics["test_acc"],
            test_loss=metrics["test_loss"],
            bytes_up=tally.bytes_up,
            bytes_down=tally.bytes_down,
            bytes_up_total=tally.bytes_up + (last.bytes_up_total if last else 0),
            bytes_down_total=tally.bytes_down + (last.bytes_down_total if last else 0),
            seconds=metrics.get("seconds", 0.0),
            train_seconds=tally.train_seconds,
            eval_seconds=metrics.get("eval_seconds", 0.0),
            client_train_loss=(
                {str(k): v for k, v in tally.train_loss.items()} if self.client_stats else {}
            ),
            accepted_clients=sorted(tally.accepted),
            rejected_clients={str(k): v for k, v in tally.rejected.items()},
            dropped_clients=dict(tally.dropped),
            straggler_clients=dict(tally.stragglers),
        )
        record.extra.update(self._contributions("round_fields", loop, record))
        scalars = {
            "test/acc": record.test_acc,
            "test/loss": record.test_loss,
            "time/round_seconds": record.seconds,
        }
        if record.round > 0:
            scalars["clients/accepted"] = len(record.accepted_clients)
            scalars["clients/rejected"] = len(record.rejected_clients)
            scalars["clients/dropped"] = len(record.dropped_clients)
            scalars["clients/stragglers"] = len(record.straggler_clients)
        if self.client_stats:
            scalars.update({f"client/{k}/train_loss": v for k, v in tally.train_loss.items()})
        if tally.train_loss and self.client_stats:
            scalars["train/loss"] = float(np.mean(list(tally.train_loss.values())))
        fabric.log_dict(scalars, step=record.round)
        self.history.append(record)
        return record

    def _contributions(self, hook: str, loop, target) -> dict[str, Any]:
        """Fields the callbacks add through ``hook``; a field may be given only once."""
        # the core fields: a record's, or those the summary already holds
        taken = RoundRecord.core_fields() if hook == "round_fields" else set(target)
        added: dict[str, Any] = {}
        for callback in self.callbacks:  # Fabric's: the user's, then the LightningModule
            contribute = getattr(callback, hook, None)
            if contribute is None:
                continue
            for key, value in (contribute(loop, target) or {}).items():
                if key in taken or key in added:
                    raise ValueError(
                        f"{type(callback).__name__}.{hook} adds {key!r}, which the run record "
                        "already has; give the field another name."
                    )
                added[key] = value
        return added

    def save(self, round_: int, model, states: dict[str, State], meta: dict) -> None:
        """Per-round checkpoint; every ``resume_every_n_rounds`` (and after the last) the
        resume state: global state, the named ``states`` (client optimizers, ...), history
        and ``meta`` (JSON); then summary.json."""
        checkpoints = self.run_dir / "checkpoints"
        checkpoint = checkpoints / f"round_{round_:03d}.safetensors"
        save_state(
            dict(model.trainable_named_parameters()),  # save_state copies to CPU itself
            checkpoint,
            metadata={"round": str(round_), "method": model.method_name},
        )
        if self.keep_last_checkpoints is not None:
            for _, path in checkpoint_rounds(checkpoints)[: -self.keep_last_checkpoints]:
                path.unlink()
        write_manifest(checkpoints, [checkpoint.name])  # verified by load_state
        if round_ % self.resume_every_n_rounds == 0 or round_ == self.rounds:

            def fill(folder: Path) -> None:
                # The round's checkpoint under a second name (it may be pruned later).
                link_or_copy(checkpoint, folder / "global.safetensors")
                for name, state in states.items():  # a State, or an iterator of its shards
                    for i, shard in enumerate([state] if isinstance(state, dict) else state):
                        save_state(shard, folder / shard_file(name, i))
                history = [r.to_dict() for r in self.history]
                write_json({"round": round_, "history": history, **meta}, folder / "state.json")

            write_folder(self.run_dir / "resume", fill, keep_previous=True)
        write_json(self.summary(model), self.run_dir / "summary.json")

    def restore(self, names: tuple[str, ...]) -> tuple[int, State, dict[str, State], dict]:
        """The last complete round: ``(round, global state, named states, meta)``.

        Reads ``resume/`` if its manifest verifies, else the previous resume state kept at
        ``resume.prev/`` (one resume point earlier; a warning names what was wrong). Round 0
        and empty states when there is nothing to resume. A folder without its
        ``manifest.json`` is refused unless :attr:`resume_without_manifest`.

        Raises:
            CorruptCheckpointError: both copies are damaged (naming the files), or the folder
                has no manifest.
        """
        target = self.run_dir / "resume"
        if not target.exists() and not prev_folder(target).exists():
            return 0, {}, {}, {}
        required = not self.resume_without_manifest
        folder = newest_valid_folder(target, required)
        if folder is None:  # names the file (or the missing manifest)
            try:
                verify_folder(target if target.exists() else prev_folder(target), required)
            except MissingManifestError as err:
                raise MissingManifestError(
                    f"{err}. Check the folder, then resume with --trainer.resume_without_manifest"
                    " true to load it unverified."
                ) from err
            raise CorruptCheckpointError(f"{target}: no complete resume state")
        saved = json.loads((folder / "state.json").read_text())
        round_ = saved.pop("round")
        self.history = [RoundRecord.from_dict(row) for row in saved.pop("history")]
        # The resume folder's own copy: per-round checkpoints may be pruned
        # (keep_last_checkpoints). Runs saved before it existed point at their round's.
        own = folder / "global.safetensors"
        checkpoint = self.run_dir / "checkpoints" / f"round_{round_:03d}.safetensors"
        global_state = load_state(own if own.exists() else checkpoint)
        states = {}
        for name in (n for n in names if (folder / shard_file(n, 0)).exists()):
            states[name] = {}
            shard = 0
            while (folder / shard_file(name, shard)).exists():  # the shards, merged
                states[name].update(load_state(folder / shard_file(name, shard)))
                shard += 1
        return round_, global_state, states, saved

    # ============================================================ summary
    def summary(self, model, loop=None) -> dict:
        """summary.json: the run's results, the callbacks' summary fields, every round."""
        accs = [r.test_acc for r in self.history]
        best = int(np.argmax(accs))
        summary = {
            "method": model.method_name,
            "model": model.name_or_path,
            "trainable_params": model.num_trainable_parameters(),
            "feature_caching_seconds": self.caching_seconds,
            # from the live parameters: no copy of the (for FedFFT, 600 MB) state just to count
            "bytes_per_client_per_direction": state_bytes(dict(model.trainable_named_parameters())),
            "final_test_acc": accs[-1],
            "best_test_acc": accs[best],
            "best_round": self.history[best].round,
            "rounds": [r.to_dict() for r in self.history],
        }
        if loop is not None:
            summary.update(self._contributions("summary_fields", loop, summary))
        return summary

    def finish(self, model, summary: dict) -> None:
        """The exported final model and summary.json."""
        write_folder(self.run_dir / "final", lambda folder: model.export(str(folder)))
        write_json(summary, self.run_dir / "summary.json")
        self.close()
