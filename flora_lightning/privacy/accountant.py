"""Privacy accounting: epsilon spent so far, from Opacus' accountants (RDP or PRV).

Both levels compose a subsampled Gaussian mechanism, one step at a time:

- **client level**: one step per round, subsampling rate ``q = clients_per_round /
  num_clients`` (``trainer.join_ratio``), noise multiplier ``sigma``. One accountant for the run.
- **sample level**: one step per local optimizer step of a client, ``q = batch_size /
  n_k`` for client ``k`` with ``n_k`` examples. Each client's examples are touched only in the
  rounds it is sampled, so each client has its own accountant (:class:`ClientAccountants`),
  stepped by that client's local steps after each of its fits; a client that was never sampled
  has spent nothing. The run reports the largest epsilon over clients: every example of every
  client is protected at that level (no amplification by client sampling is claimed).

Both analyses assume Poisson subsampling at rate ``q``. At sample level the batches are
Poisson-sampled at that ``q`` (``privacy.sampling: poisson``, the default, as the released
code's Opacus ``make_private``), so the bound holds; with ``shuffle`` (fixed-size batches) it is
an approximation. At client level the loop samples a fixed number of clients: the usual
approximation of DP-FL code, stated, not hidden. At sample level the server's
FedAvg weights clients by their example counts ``n_k``: the guarantee takes ``n_k`` (the
partition sizes) as public. The arithmetic is Opacus' own
(:class:`opacus.accountants.RDPAccountant` / ``PRVAccountant``); this module only keeps the
schedule, the per-client bookkeeping and a resumable state.
"""

from __future__ import annotations

import math

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from flora_lightning.federation.local_trainer import local_steps  # noqa: F401  (re-exported: steps accounted)


class Accountant:
    """Epsilon of a subsampled Gaussian mechanism composed over the steps taken so far.

    Args:
        sample_rate: q, the subsampling probability of one record per step, in (0, 1].
        noise_multiplier: sigma, the noise std over the clip bound (0: no privacy, eps = inf).
        delta: the delta epsilon is reported at.
        mechanism: ``rdp`` or ``prv`` (``privacy.accountant``).
    """

    def __init__(
        self, sample_rate: float, noise_multiplier: float, delta: float, mechanism: str = "rdp"
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(
                f"the privacy sample rate must be in (0, 1] (got {sample_rate}): check "
                "data.batch_size against the client's examples, or trainer.join_ratio."
            )
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.mechanism = mechanism
        self._accountant = create_accountant(mechanism)

    @property
    def steps(self) -> int:
        """Mechanism steps composed so far."""
        return sum(n for _, _, n in self._accountant.history)

    def step(self, n: int = 1) -> None:
        """Compose ``n`` more steps (Opacus merges equal consecutive steps into one entry)."""
        if n < 0:
            raise ValueError(f"Accountant.step needs n >= 0 (got {n}).")
        for _ in range(n):
            self._accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` after the steps so far (0 before any; inf when sigma=0)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self._accountant.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict:
        """What a resume needs: the settings and Opacus' composition history."""
        return {
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant": self._accountant.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; settings that differ from this accountant's are refused
        (the resumed run would report an epsilon for a mechanism it did not run)."""
        for key in ("sample_rate", "noise_multiplier", "delta"):
            if not math.isclose(state[key], getattr(self, key), rel_tol=1e-12):
                raise ValueError(
                    f"the resume state was accounted with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: resume with the same privacy settings."
                )
        inner = dict(state["accountant"])
        # JSON turns Opacus' (sigma, q, steps) tuples into lists: restore them.
        inner["history"] = [tuple(entry) for entry in inner["history"]]
        self._accountant.load_state_dict(inner)


class ClientAccountants:
    """Sample-level accounting: one :class:`Accountant` per client, stepped by its own fits.

    Args:
        sample_rates: client id -> its ``q = batch_size / n_k`` (capped at 1).
        noise_multiplier: sigma of DP-SGD.
        delta: the delta epsilon is reported at.
        mechanism: ``rdp`` or ``prv``.
    """

    def __init__(
        self,
        sample_rates: dict[int, float],
        noise_multiplier: float,
        delta: float,
        mechanism: str = "rdp",
    ) -> None:
        self.accountants = {
            client: Accountant(min(1.0, q), noise_multiplier, delta, mechanism)
            for client, q in sample_rates.items()
        }

    def step(self, client: int, n: int) -> None:
        """Compose the ``n`` local DP-SGD steps ``client`` just took."""
        self.accountants[client].step(n)

    def epsilons(self) -> dict[int, float]:
        """Client id -> its epsilon so far."""
        return {client: acc.epsilon() for client, acc in self.accountants.items()}

    def epsilon(self) -> float:
        """The largest epsilon over clients: the run's sample-level guarantee."""
        return max(self.epsilons().values(), default=0.0)

    def state_dict(self) -> dict:
        return {str(client): acc.state_dict() for client, acc in self.accountants.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {str(c) for c in self.accountants}:
            raise ValueError(
                "the resume state's privacy accountants are for other clients: resume with "
                "the same data.partition and data.num_clients."
            )
        for client, acc in self.accountants.items():
            acc.load_state_dict(state[str(client)])


def noise_for_target(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    mechanism: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon after ``steps``
    steps at rate ``sample_rate`` is at most ``target_epsilon``: Opacus' own search
    (:func:`opacus.accountants.utils.get_noise_multiplier`).

    For sample level pass the largest client rate and step count (the plan's worst client);
    for client level ``q = clients_per_round / num_clients`` and ``steps = rounds``.

    Raises:
        ValueError: naming ``privacy.target_epsilon`` when no noise reaches it.
    """
    if steps < 1:
        raise ValueError(f"noise_for_target needs steps >= 1 (got {steps}).")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as err:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} cannot be reached in {steps} steps at "
            f"sample rate {sample_rate} and delta {delta} ({err}): raise it, or plan fewer "
            "rounds or a smaller sample rate."
        ) from err


def resolve_noise_multiplier(privacy, sample_rate: float, steps: int) -> float:
    """``privacy.noise_multiplier``, or the one :func:`noise_for_target` picks for
    ``privacy.target_epsilon`` over the planned ``steps`` at ``sample_rate``.

    Args:
        privacy: a :class:`~flora_lightning.privacy.config.PrivacyConfig` with a DP level.
        sample_rate: client level: ``clients_per_round / num_clients``; sample level: the
            largest ``batch_size / n_k`` over clients.
        steps: client level: ``rounds``; sample level: ``rounds`` x the largest
            :func:`local_steps` over clients (as if that client joined every round).
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    return noise_for_target(
        privacy.target_epsilon, min(1.0, sample_rate), steps, privacy.delta, privacy.accountant
    )
