"""``BatchedAdam``: K clients' own Adam states, stepped together on stacked parameters.

``trainer.parallel_clients`` trains K clients' adapters as tensors with a leading client
dimension ``[K, ...]``. Each client keeps its own optimizer state across rounds (the paper), and
clients resume different states: client 3 may be at Adam step 40 while client 7 starts fresh.
This is torch's ``Adam`` (single-tensor path, coupled weight decay, no amsgrad) written once for
the stack, with each client's own step count ``t_k`` in its bias corrections::

    g   = grad + wd * p                          (coupled L2, torch.optim.Adam)
    m   = lerp(m, g, 1 - beta1)
    v   = beta2 * v + (1 - beta2) * g * g
    t_k = t_k + 1
    p   = p - (lr / (1 - beta1^t_k)) * m / (sqrt(v) / sqrt(1 - beta2^t_k) + eps)

The bias corrections are computed in float64 from the step count, as torch does in Python
floats, then rounded to the parameters' dtype. A client whose fit has ended (``active`` false)
keeps its parameters, moments and step count unchanged. States come from and go back to the
format of ``optimizer.state_dict()["state"]`` (``{index: {step, exp_avg, exp_avg_sq}}``, index
in the order of the method's ``optimized_parameters``), so the trainer's per-client store holds
the same thing whichever way a client trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora_lightning.methods.settings import OptimizerConfig


class BatchedAdam:
    """Adam states of K clients for parameters stacked ``[K, ...]``.

    Args:
        params: the stacked parameters (not modified here except by :meth:`step`).
        config: the method's optimizer settings (shared by every client).
        states: each client's kept ``optimizer.state_dict()["state"]``, or None for a fresh
            optimizer (zero moments, step 0, as torch's lazy initialisation).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        config: OptimizerConfig,
        states: Sequence[dict | None],
    ) -> None:
        self.params = list(params)
        self.lr, self.eps, self.weight_decay = config.lr, config.eps, config.weight_decay
        self.beta1, self.beta2 = (float(b) for b in config.betas)
        num = len(states)
        if any(p.shape[0] != num for p in self.params):
            raise ValueError(f"BatchedAdam: every stacked parameter needs {num} client rows.")
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(num, dtype=torch.float64)
        """Each client's Adam step count ``t_k`` (float64: exact for any realistic count)."""
        self.had_state = [state is not None and len(state) > 0 for state in states]
        self.step_dtype = default_step_dtype()
        for k, state in enumerate(states):
            if state:
                self.load_client(k, state)

    def load_client(self, k: int, state: dict) -> None:
        """Client ``k``'s kept state into row ``k`` (cast to the parameters' device and dtype,
        as ``Optimizer.load_state_dict`` does)."""
        if set(state) != set(range(len(self.params))):
            raise ValueError(
                f"BatchedAdam: a kept optimizer state has entries {sorted(state)} for "
                f"{len(self.params)} parameters."
            )
        steps = {float(slots["step"]) for slots in state.values()}
        if len(steps) != 1:
            raise ValueError(f"BatchedAdam: one client's parameters have step counts {steps}.")
        for i, slots in state.items():
            param = self.params[i]
            self.exp_avg[i][k].copy_(slots["exp_avg"].to(param.device, param.dtype))
            self.exp_avg_sq[i][k].copy_(slots["exp_avg_sq"].to(param.device, param.dtype))
            self.step_dtype = slots["step"].dtype
        self.steps[k] = steps.pop()

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], active: torch.Tensor) -> None:
        """One Adam step of the clients where ``active`` (bool ``[K]``); the others unchanged.

        ``grads`` are the stacked gradients (rows of inactive clients are ignored).
        """
        new_steps = self.steps + active.to(self.steps.dtype).cpu()
        # torch computes these in Python floats (float64) from the step count; a client that
        # does not step gets harmless finite values (t >= 1) and is masked below.
        t = new_steps.clamp(min=1)
        step_size = self.lr / (1 - self.beta1**t)
        bias2_sqrt = (1 - self.beta2**t) ** 0.5
        for i, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            shape = (-1,) + (1,) * (param.dim() - 1)
            keep = active.to(param.device).view(shape)
            size = step_size.to(param.device, param.dtype).view(shape)
            b2 = bias2_sqrt.to(param.device, param.dtype).view(shape)
            g = grad.add(param, alpha=self.weight_decay) if self.weight_decay else grad
            m = self.exp_avg[i].lerp(g, 1 - self.beta1)
            v = self.exp_avg_sq[i].mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / b2).add_(self.eps)
            # addcdiv's kernel computes p + (value * m) / denom: the same order here
            updated = param + (-size * m) / denom
            param.copy_(torch.where(keep, updated, param))
            self.exp_avg[i] = torch.where(keep, m, self.exp_avg[i])
            self.exp_avg_sq[i] = torch.where(keep, v, self.exp_avg_sq[i])
        self.steps = new_steps

    def client_state(self, k: int) -> dict:
        """Client ``k``'s state as ``optimizer.state_dict()["state"]`` (empty when it never
        stepped: torch creates the state at the first step)."""
        if self.steps[k] == 0 and not self.had_state[k]:
            return {}
        step = torch.tensor(float(self.steps[k]), dtype=self.step_dtype)
        return {
            i: {
                "step": step.clone(),
                "exp_avg": self.exp_avg[i][k].detach().clone(),
                "exp_avg_sq": self.exp_avg_sq[i][k].detach().clone(),
            }
            for i in range(len(self.params))
        }


def default_step_dtype() -> torch.dtype:
    """The dtype torch's Adam gives a fresh ``step`` on the CPU: float64 when that is the
    default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
