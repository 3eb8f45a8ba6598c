"""``PersonalizedEvaluation``: the global model on every client's own test set, every n rounds.

Needs ``data.local_test_fraction`` (each client keeps a seeded share of its partition as a
local test set). Every ``every`` rounds (round 0 included) the global model is evaluated on
each client's local test set and, with ``finetune_steps = k > 0``, again after k local steps
from the global state (personalised accuracy; the global state and the clients' optimizer
states are left as they were, see :func:`flora_lightning.federation.client_evaluation.evaluate_clients`).
Under ``privacy.level sample`` only ``finetune_steps: 0`` is accepted (refused by
:meth:`PrivacyRun.check <flora_lightning.privacy.run.PrivacyRun.check>` before the run starts):
the fine-tuning would train on the clients' private data outside DP-SGD and its accountant.

Round record: ``local_acc_mean``, ``_min``, ``_max``, ``_std`` and ``client_local_acc`` (and
the ``personalized_acc`` ones with k > 0). TensorBoard: ``local/acc_mean`` ... and
``personalized/acc_mean`` .... Summary: the last evaluated round's spread. The global test
accuracy is reported as always. Turn it on with::

    trainer:
      callbacks:
        - class_path: flora_lightning.callbacks.PersonalizedEvaluation
          init_args: {every: 1, finetune_steps: 5}
"""

from __future__ import annotations

from flora_lightning.callbacks.base import Callback
from flora_lightning.federation.client_evaluation import evaluate_clients

STATS = ("mean", "min", "max", "std")


class PersonalizedEvaluation(Callback):
    """Local and personalised accuracy of every client (see the module docstring).

    Args:
        every: evaluate every n rounds (round 0 included), n >= 1.
        finetune_steps: local steps before the personalised evaluation; 0: local accuracy only.
    """

    needs_client_data = True
    """The Flower ServerApp then caches every client's data (it holds the dataset to build
    the global test set; on Flower, clients' local test sets are evaluated there)."""

    def __init__(self, every: int = 1, finetune_steps: int = 0) -> None:
        if every < 1:
            raise ValueError(f"PersonalizedEvaluation.every must be >= 1 (got {every}).")
        if finetune_steps < 0:
            raise ValueError(
                f"PersonalizedEvaluation.finetune_steps must be >= 0 (got {finetune_steps}); "
                "0 evaluates the global model only."
            )
        self.every = every
        self.finetune_steps = finetune_steps
        self.last: dict = {}

    def on_fit_start(self, loop, model) -> None:
        if not loop.datamodule.has_local_test:
            raise ValueError(
                "PersonalizedEvaluation needs data.local_test_fraction (each client's local "
                "test share), e.g. --data.local_test_fraction 0.2."
            )

    def round_fields(self, loop, record) -> dict:
        if record.round % self.every:
            return {}
        data = loop.datamodule
        result = evaluate_clients(
            loop.fabric,
            loop.model,
            loop.feature_cache or data,
            list(range(data.num_clients)),
            len(data.class_names),
            trainer=loop.local_trainer,
            finetune_steps=self.finetune_steps,
            round_=record.round,
        )
        fields, scalars = {}, {}
        for name, prefix in (("local_acc", "local"), ("personalized_acc", "personalized")):
            if name not in result:
                continue
            fields[f"client_{name}"] = {str(c): v for c, v in result[name].items()}
            for stat in STATS:
                fields[f"{name}_{stat}"] = result[f"{name}_{stat}"]
                scalars[f"{prefix}/acc_{stat}"] = result[f"{name}_{stat}"]
        loop.fabric.log_dict(scalars, step=record.round)
        self.last = {k: v for k, v in fields.items() if not k.startswith("client_")}
        return fields

    def summary_fields(self, loop, summary: dict) -> dict:
        return dict(self.last)
