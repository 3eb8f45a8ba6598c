"""How a local step runs: eager, compiled (``trainer.compile``) or captured in CUDA graphs
(``trainer.cuda_graphs``).

FLoRA's local step is small (a text tower over a few captions, a head over cached features):
on a GPU it is bound by kernel launches and Python, not by arithmetic. Compiling it fuses the
kernels; capturing it in CUDA graphs replays the forward and backward as a few graph launches
(the optimizer step is one fused kernel). Both apply to every method alike (FedFFT included), so comparisons stay fair.

What is compiled is the method's ``training_step`` (forward and, through AOTAutograd, its
backward); the optimizer step stays torch's (fused Adam on CUDA: one kernel for all
parameters, which changes parameters in place between replays, as CUDA graph trees expect).
Compiling torch's Adam would compute its bias corrections from a float32 step count, moving
every update by ~1e-7 relative: the eager optimizer keeps the update exactly eager's.
``torch.compile`` traces the step once per batch shape: the full batch, then (with dynamic
shapes from the second shape on) every last partial batch.

Where it cannot apply, the step runs eagerly and the reason is logged once:
- CUDA graphs need a CUDA device (``auto`` is off elsewhere);
- a replaced step (``step_fn``: sample-level DP-SGD's per-example step) runs as written;
"""

from __future__ import annotations

import logging

import torch

from flora_lightning.federation.settings import CudaGraphs, check_capture_settings  # noqa: F401

log = logging.getLogger(__name__)

_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` (INFO) the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def plan_capture(device: torch.device, cuda_graphs: str, compile: bool) -> CompiledStep | None:
    """The step runner for these settings on ``device``: None runs the eager step.

    ``cuda_graphs: auto`` captures on CUDA (``torch.compile(mode="reduce-overhead")``: CUDA
    graph trees); ``compile: true`` compiles without graphs (any device).
    """
    check_capture_settings(cuda_graphs, compile)
    graphs = cuda_graphs == "auto" and device.type == "cuda"
    if cuda_graphs == "auto" and not graphs:
        log_once(f"trainer.cuda_graphs=auto: off on {device.type} (CUDA graphs need CUDA).")
    if not (graphs or compile):
        return None
    return CompiledStep(cuda_graphs=graphs)


class CompiledStep:
    """The local step compiled (and on CUDA captured) once, replayed for every client.

    Args:
        cuda_graphs: compile with ``mode="reduce-overhead"`` (CUDA graphs; CUDA only) and make
            the optimizer capturable; False: inductor's default mode (kernels fused, no
            graphs).
    """

    def __init__(self, cuda_graphs: bool = False) -> None:
        self.cuda_graphs = cuda_graphs
        self.mode = "reduce-overhead" if cuda_graphs else None
        self.model = None
        self.forward = None

    @property
    def what(self) -> str:
        return "captured in CUDA graphs" if self.cuda_graphs else "compiled"

    def compiled_forward(self, model):
        """``model.training_step`` compiled (once per model)."""
        if model is not self.model:
            self.model = model
            self.forward = torch.compile(model.training_step, mode=self.mode)
            log_once(f"The local step is {self.what} ({type(model).__name__}).")
        return self.forward

    def begin_step(self) -> None:
        """Before each step under CUDA graphs: the last step's outputs are consumed."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
