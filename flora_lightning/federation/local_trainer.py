"""``LocalTrainer``: one client's local fit on a Lightning Fabric, and its optimizer state.

The one place a local optimizer step is written. The in-process :class:`FederatedLoop`, the
Flower ClientApp, :class:`~flora_lightning.callbacks.speedup.SpeedupVsFFT` and the bench
worker all train (or time) through it, so a step is the same everywhere::

    training_step under fabric.autocast() → fabric.backward → optimizer.step → zero_grad

Every random choice of a client fit is seeded from ``(seed, round, client)``, so a resumed
run, or a Flower node playing that client, repeats what an uninterrupted in-process run does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flora_lightning.client_state.stores import ClientStates, client_states
from flora_lightning.federation.step_capture import CompiledStep, log_once
from flora_lightning.strategy import ClientUpdate


class MeanLoss:
    """The sample-weighted mean of a fit's batch losses, in float64 on the loss's device (no
    host sync per step). A NaN or Inf loss makes the mean NaN/Inf, as a diverged fit must.

    (torchmetrics' ``MeanMetric(nan_strategy="disable")``, used before, drops the weights it is
    given: it averaged batch losses unweighted, so a last batch of 5 rows counted as much as
    one of 32.)
    """

    def __init__(self, device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, loss: torch.Tensor, rows: int) -> None:
        self.total += loss.detach().to(torch.float64) * rows
        self.rows += rows

    def compute(self) -> float:
        """The mean over every row seen; NaN when none was."""
        return float(self.total / self.rows) if self.rows else math.nan


class ProximalTerm:
    """FedProx's ``mu/2 * sum ||w - w0||^2`` over a module's trainable parameters.

    ``w0`` is a detached copy of the trainable parameters when the term is made (at the start of
    a client's fit: the global state), so its gradient is ``mu * (w - w0)``.
    """

    def __init__(self, module: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchors = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad]

    def __call__(self) -> torch.Tensor:
        """The term's value, attached to the parameters' graph."""
        return self.mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in self.anchors)


def local_step(
    fabric,
    module,
    optimizer,
    batch,
    batch_idx: int,
    proximal: ProximalTerm | None = None,
    training_step=None,
) -> torch.Tensor:
    """One local optimizer step; returns the (still attached) loss.

    ``training_step`` (default ``module.training_step``; the compiled one under
    ``trainer.compile``/``cuda_graphs``: :func:`captured_step`) runs under the Fabric precision
    autocast (Fabric only wraps ``forward`` itself), then ``fabric.backward``, the optimizer
    step and ``zero_grad(set_to_none=True)``. With ``proximal`` (FedProx) the step minimises
    ``loss + proximal()``; the returned loss is the training loss alone.
    """
    forward = module.training_step if training_step is None else training_step
    with fabric.autocast():
        loss = forward(batch, batch_idx)
    fabric.backward(loss if proximal is None else loss + proximal())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def captured_step(capture: CompiledStep, fabric, model, optimizer, proximal=None):
    """``step(batch, batch_idx) -> loss``: :func:`local_step` with ``capture``'s compiled
    forward (and, under CUDA graphs, a new graph step marked first)."""
    forward = capture.compiled_forward(model)

    def step(batch, batch_idx: int) -> torch.Tensor:
        capture.begin_step()
        return local_step(fabric, model, optimizer, batch, batch_idx, proximal, forward)

    return step


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """``ceil(n / batch)``: the batches of a shuffled epoch (no ``drop_last``), and the steps
    of a Poisson-sampled one (sample-level DP-SGD draws that many batches per epoch)."""
    return math.ceil(num_samples / batch_size)


def local_steps(
    num_samples: int, batch_size: int, local_epochs: int, max_local_steps: int | None
) -> int:
    """Optimizer steps of one full client fit: :func:`steps_per_epoch` per epoch, capped by
    ``max_local_steps``."""
    steps = local_epochs * steps_per_epoch(num_samples, batch_size)
    return steps if max_local_steps is None else min(steps, max_local_steps)


class LocalTrainer:
    """Local training of one client at a time from the model's currently loaded state.

    Args:
        fabric: a launched Fabric (device, precision); the model is set up with it.
        local_epochs: local epochs per client per round.
        max_local_steps: stop a client's fit after this many optimizer steps (None: no cap).
        keep_optimizer_state: each client keeps its optimizer (Adam) state across rounds, in
            :attr:`optimizer_states`; a fit that diverges (NaN/Inf loss or state) drops it.
        seed: the run's seed; per-fit seeds derive from ``(seed, round, client)``.
        step_fn: replaces :func:`local_step` with the same signature, e.g. sample-level DP-SGD
            (:class:`~flora_lightning.privacy.dpsgd.DPSGDStep`); before each fit its
            ``batch_sampler(n, batch_size, steps_per_epoch, generator)`` may draw the fit's
            batches (None: the loader shuffles; DP-SGD's Poisson sampling uses the data-order
            generator, so every runtime and a cached fit draw the same), and its
            ``start_fit(seed)`` runs with the fit's stream-2 seed. None: the plain step.
        client_state_dir: keep the clients' optimizer states on disk, one safetensors file per
            client in this folder (:class:`~flora_lightning.client_state.stores.DiskStates`), read at
            the client's fit and written after it; None: in memory.
        capture: run the step compiled or captured in CUDA graphs (see
            :func:`~flora_lightning.federation.step_capture.plan_capture`); None: eager.
    """

    def __init__(
        self,
        fabric,
        local_epochs: int = 1,
        max_local_steps: int | None = None,
        keep_optimizer_state: bool = True,
        seed: int = 42,
        step_fn=None,
        client_state_dir: str | None = None,
        capture: CompiledStep | None = None,
    ) -> None:
        self.fabric = fabric
        self.capture = capture
        """The compiled/captured step runner (``trainer.compile``/``cuda_graphs``); None:
        eager."""
        self.local_epochs = local_epochs
        self.max_local_steps = max_local_steps
        self.keep_optimizer_state = keep_optimizer_state
        self.seed = seed
        self.step_fn = step_fn
        self.state_store = client_states(client_state_dir)
        """Where the clients' optimizer states live (:attr:`optimizer_states` is this store)."""

    @property
    def optimizer_states(self) -> ClientStates:
        """Client id -> its optimizer's ``state_dict()["state"]`` (on CPU), in memory or on disk
        (``client_state_dir``); assigning a mapping replaces the contents, same storage."""
        return self.state_store

    @optimizer_states.setter
    def optimizer_states(self, states) -> None:
        if states is not self.state_store:
            self.state_store.replace(dict(states))

    def seed_for(self, round_: int, client: int, stream: int = 0) -> int:
        """The seed of ``stream`` (0: torch RNG, 1: data order, 2: ``step_fn``, e.g. DP noise)
        of a client's fit in a round."""
        return int(np.random.default_rng([self.seed, round_, client, stream]).integers(2**62))

    def planned_steps(self, num_samples: int, batch_size: int) -> int:
        """Optimizer steps of a full fit on ``num_samples`` (see :func:`local_steps`)."""
        return local_steps(num_samples, batch_size, self.local_epochs, self.max_local_steps)

    def fit(
        self,
        model,
        data,
        client: int,
        round_: int,
        source=None,
        proximal_mu: float = 0.0,
        max_steps: int | None = None,
    ) -> ClientUpdate:
        """Local training of ``client`` in ``round_``; returns its update.

        Args:
            model: the method, set up with :attr:`fabric` and holding the global state.
            data: the federated datamodule (the client's sample count).
            client: the client id.
            round_: the round (seeds).
            source: what yields the client's batches (``client_dataloader(client, generator)``):
                a :class:`~flora_lightning.clip.feature_cache.FeatureCache`, or ``data`` when None.
            proximal_mu: FedProx's ``mu`` (the strategy's ``proximal_mu``): each step adds
                ``mu/2 * ||w - w_global||^2`` over the trainable parameters, ``w_global`` their
                values now; 0 adds nothing.
            max_steps: stop after this many steps (a straggler's share); None: a full fit.
        """
        if not proximal_mu >= 0:
            raise ValueError(f"trainer.strategy.mu must be >= 0 (got {proximal_mu}).")
        torch.manual_seed(self.seed_for(round_, client))  # dropout etc.
        generator = torch.Generator().manual_seed(self.seed_for(round_, client, 1))
        loader = self.client_loader(data, source or data, client, generator)
        optimizer = self.client_optimizer(model, client)
        proximal = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
        step = self.step_for(model, optimizer, proximal, self.seed_for(round_, client, 2))
        cap = min(max_steps or math.inf, self.max_local_steps or math.inf)
        train_loss, seen = self.run_steps(model, loader, step, cap)
        state = model.communicated_state()
        self.keep_optimizer_state_of(client, optimizer, state, train_loss, seen)
        return ClientUpdate(
            client_id=client,
            state=state,
            num_samples=data.num_samples(client),
            train_loss=train_loss,
        )

    def client_loader(self, data, source, client: int, generator: torch.Generator):
        """The client's batches for one fit, in the order ``generator`` draws (DP-SGD's
        Poisson sampling draws them with its batch sampler)."""
        batch_sampler = None
        if self.step_fn is not None:
            n, batch_size = data.num_samples(client), data.batch_size
            batch_sampler = self.step_fn.batch_sampler(
                n, batch_size, steps_per_epoch(n, batch_size), generator
            )
        return self.fabric.setup_dataloaders(
            source.client_dataloader(client, generator, batch_sampler),
            use_distributed_sampler=False,
        )

    def client_optimizer(self, model, client: int):
        """A fresh optimizer for this fit, holding the client's kept state if any."""
        optimizer = model.configure_optimizers()
        if self.keep_optimizer_state and client in self.state_store:
            saved = optimizer.state_dict()
            saved["state"] = self.state_store[client]
            optimizer.load_state_dict(saved)
        return self.fabric.setup_optimizers(optimizer)

    @property
    def uses_capture(self) -> bool:
        """Whether fits run the compiled/captured step: set up, and no replaced step."""
        if self.capture is None:
            return False
        if self.step_fn is not None:
            log_once(
                f"The local step is not {self.capture.what}: {type(self.step_fn).__name__} "
                "replaces it (per-example gradients run eagerly)."
            )
            return False
        return True

    def step_for(self, model, optimizer, proximal, step_seed: int):
        """``step(batch, batch_idx) -> loss``: the fit's local step (eager, compiled or
        ``step_fn``, which starts its fit with ``step_seed``)."""
        fabric = self.fabric
        if self.step_fn is not None:
            if proximal is not None:
                raise ValueError(
                    "privacy.level=sample does not support FedProx's proximal term; use "
                    "trainer.strategy FedAvg with DP-SGD."
                )
            self.step_fn.start_fit(step_seed)
            return lambda batch, i: self.step_fn(fabric, model, optimizer, batch, i)
        if self.uses_capture:
            return captured_step(self.capture, fabric, model, optimizer, proximal)
        return lambda batch, i: local_step(fabric, model, optimizer, batch, i, proximal)

    def run_steps(self, model, loader, step, cap: float) -> tuple[float, int]:
        """Up to ``local_epochs`` epochs of ``step`` over ``loader``, at most ``cap`` steps;
        returns the sample-weighted mean training loss (NaN when no example was drawn: only
        empty Poisson batches) and the examples seen."""
        model.train()
        mean_loss = MeanLoss(self.fabric.device)
        steps = seen = 0
        for _ in range(self.local_epochs):
            for batch_idx, batch in enumerate(loader):
                loss = step(batch, batch_idx)
                if len(batch[1]):  # a Poisson batch may be empty: a step, but no loss
                    mean_loss.update(loss, len(batch[1]))
                    seen += len(batch[1])
                steps += 1
                if steps >= cap:
                    break
            if steps >= cap:
                break
        model.eval()
        return mean_loss.compute(), seen

    def keep_optimizer_state_of(self, client: int, optimizer, state, train_loss, seen) -> None:
        """Keep the client's optimizer state for its next fit; a diverged fit (NaN/Inf loss or
        state) drops it instead: its moments would poison every later round of this client,
        so it starts the next one fresh (the strategy refuses the update itself)."""
        finite = all(t.isfinite().all() for t in state.values())
        if not (finite and (math.isfinite(train_loss) or not seen)):
            self.optimizer_states.pop(client, None)
        elif self.keep_optimizer_state:  # the store copies what it keeps
            self.optimizer_states[client] = {
                i: {k: v.detach().to("cpu") if torch.is_tensor(v) else v for k, v in slots.items()}
                for i, slots in optimizer.state_dict()["state"].items()
            }
