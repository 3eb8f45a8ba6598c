"""``PrivacyRun``: a run's differential privacy, set up on the loop and accounted per round.

Built by the loop when ``privacy.level`` is ``sample`` or ``client`` (both runtimes: the
ServerApp and each ClientApp build the same loop from the same YAML)::

    setup(loop)   check the strategy/method, resolve the noise multiplier (given, or from
                  privacy.target_epsilon over the planned rounds), then
                  client level: trainer.strategy becomes DPFedAvg (clip, unweighted mean,
                                noise sigma*C/m); one accountant, q = clients per round / N,
                                one step per aggregated round
                  sample level: the LocalTrainer's step becomes DPSGDStep; one accountant per
                                client, q = batch / n_k, one step per local step it takes
    round_fields  epsilon after the round (TensorBoard ``privacy/epsilon``, summary rounds)
    summary_fields  ``privacy: {level, epsilon, delta, noise_multiplier, clip, accountant}``
                    and, at sample level, ``sampling`` (``poisson`` or ``shuffle``)

Sample-level steps are counted from the client's sample count (:func:`local_steps`, exactly
the steps :class:`~flora_lightning.federation.local_trainer.LocalTrainer` takes), so the ServerApp, which
trains nothing, accounts the same epsilon as ``flora fit``.
"""

from __future__ import annotations

import numpy as np

from flora_lightning.callbacks.base import Callback
from flora_lightning.privacy.accountant import (
    Accountant,
    ClientAccountants,
    local_steps,
    resolve_noise_multiplier,
)
from flora_lightning.privacy.client_dp import DPFedAvg
from flora_lightning.privacy.config import PrivacyConfig, check_compatible
from flora_lightning.privacy.dpsgd import DPSGDStep


def refuse_shared_records(client_indices) -> None:
    """Sample level: refuse partitions in which a training record belongs to several clients.

    Each client's accountant bounds what *its* DP-SGD run reveals about a record; a record
    held by ``k`` clients goes through ``k`` runs, and its guarantee is their composition, not
    the largest client epsilon the run reports. Overlapping few-shot partitions
    (``data.partition.shots_overlap: true``, the released default) do this.

    Raises:
        ValueError: naming ``privacy.level`` and ``data.partition.shots_overlap``.
    """
    rows = np.concatenate([np.asarray(i, dtype=np.int64) for i in client_indices] or [[]])
    unique, counts = np.unique(rows, return_counts=True)
    if unique.size < rows.size:
        shared = int((counts > 1).sum())
        raise ValueError(
            f"privacy.level=sample with partitions that share training records ({shared} "
            f"records belong to more than one client, up to {int(counts.max())}): each "
            "client's epsilon would not bound what the run reveals about a shared record. "
            "Set data.partition.shots_overlap: false (disjoint few-shot partitions), use "
            "privacy.level=client, or a partition.kind whose clients are disjoint."
        )


class PrivacyRun(Callback):
    """The privacy of one run (see the module docstring).

    Args:
        privacy: the ``--privacy.*`` settings (a DP level).
    """

    def __init__(self, privacy: PrivacyConfig) -> None:
        self.privacy = privacy
        self.noise_multiplier = 0.0
        self.accountant: Accountant | ClientAccountants | None = None
        self.steps: dict[int, int] = {}
        """Client id -> local steps of one fit (sample level)."""

    def check(self, loop, model) -> None:
        """Before anything loads: the strategy, method and callbacks can honour the level."""
        check_compatible(self.privacy, loop.strategy, model)
        if self.privacy.level == "sample":
            from flora_lightning.callbacks.personalized import PersonalizedEvaluation
            from flora_lightning.federation.client_evaluation import refuse_private_finetuning

            for callback in loop.callbacks:
                if isinstance(callback, PersonalizedEvaluation) and callback.finetune_steps > 0:
                    raise ValueError(refuse_private_finetuning(callback.finetune_steps))

    def setup(self, loop) -> None:
        """After the loop's launch (data sizes known): noise, strategy or step, accountant."""
        privacy, data = self.privacy, loop.datamodule
        clients = range(data.num_clients)
        if privacy.level == "client":
            per_round = loop.clients_per_round(data.num_clients)
            q = per_round / data.num_clients
            self.noise_multiplier = resolve_noise_multiplier(privacy, q, loop.rounds)
            loop.strategy = DPFedAvg.from_config(
                privacy, self.noise_multiplier, per_round, loop.seed, loop.strategy.min_clients,
                loop.strategy.max_num_samples,
            )  # fmt: skip
            self.accountant = Accountant(q, self.noise_multiplier, privacy.delta,
                                         privacy.accountant)  # fmt: skip
            return
        refuse_shared_records(data.client_indices)
        self.steps = {
            k: local_steps(
                data.num_samples(k), data.batch_size, loop.local_epochs, loop.max_local_steps
            )  # fmt: skip
            for k in clients
        }
        rates = {k: min(1.0, data.batch_size / data.num_samples(k)) for k in clients}
        planned = loop.rounds * max(self.steps.values())
        self.noise_multiplier = resolve_noise_multiplier(privacy, max(rates.values()), planned)
        loop.local_trainer.step_fn = DPSGDStep.from_config(privacy, self.noise_multiplier)
        self.accountant = ClientAccountants(
            rates, self.noise_multiplier, privacy.delta, privacy.accountant
        )

    @property
    def clip(self) -> float:
        return self.privacy.clip

    def on_client_fit_end(self, loop, model, update) -> None:
        if self.privacy.level == "sample":
            self.accountant.step(update.client_id, self.steps[update.client_id])

    def round_fields(self, loop, record) -> dict:
        if (
            self.privacy.level == "client"
            and record.round > 0
            and len(record.accepted_clients) >= loop.strategy.min_clients
        ):
            self.accountant.step(1)  # one noised aggregate released this round
        epsilon = self.accountant.epsilon()
        loop.fabric.log_dict({"privacy/epsilon": epsilon}, step=record.round)
        fields = {"privacy_epsilon": epsilon}
        if self.privacy.level == "client":
            fields["privacy_clip_norm"] = loop.strategy.round_clip_norm
        return fields

    def summary_fields(self, loop, summary: dict) -> dict:
        clip = loop.strategy.clip_norm if self.privacy.level == "client" else self.clip
        return {
            "privacy": {
                "level": self.privacy.level,
                "epsilon": self.accountant.epsilon(),
                "delta": self.privacy.delta,
                "noise_multiplier": self.noise_multiplier,
                "clip": clip,
                "accountant": self.privacy.accountant,
                # sample level: how the DP-SGD batches were drawn (shuffle: epsilon approximate)
                **({"sampling": self.privacy.sampling} if self.privacy.level == "sample" else {}),
            }
        }

    def on_fit_end(self, loop, model, summary: dict) -> None:
        loop.fabric.print(
            f"Privacy ({self.privacy.level} level): epsilon = {self.accountant.epsilon():.3f} "
            f"at delta = {self.privacy.delta:g} (noise multiplier {self.noise_multiplier:.4f})."
        )

    def state_dict(self) -> dict:
        """The accountant's state (JSON), for resume."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state)
