"""Timing local optimizer steps with ``torch.utils.benchmark.Timer.blocked_autorange``."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class StepTiming:
    """What :func:`time_steps` measured.

    ``seconds`` is the Timer's median per step (over its blocks); ``cpu_seconds`` is the
    process's CPU time (all threads) per step, a *mean* over every step the Timer ran.
    """

    seconds: float
    """Median wall-clock seconds per step (``Measurement.median``)."""
    cpu_seconds: float
    """Process CPU seconds per step: CPU time over all the Timer's steps / their number."""
    timed_steps: int
    """Steps in the Timer's measured blocks (block size x blocks)."""
    timed_seconds: float
    """Wall-clock seconds of the measured blocks together (at least ``min_seconds``)."""
    block_seconds: list[float]
    """Per-step seconds of each measured block (``Measurement.times``)."""


def time_steps(
    fabric,
    module,
    batch,
    steps: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
    step_fn=None,
    capture=None,
) -> StepTiming:
    """Time local optimizer steps on ``batch`` with ``torch.utils.benchmark.Timer``.

    A step is :func:`flora_lightning.federation.local_trainer.local_step` (what ``LocalTrainer.fit`` runs per
    batch: ``training_step`` under the precision autocast, backward, Adam step, ``zero_grad``)
    followed by ``loss.item()``, which waits for the step as the loop's loss bookkeeping does.
    ``warmup`` untimed steps run first; then ``blocked_autorange(min_run_time=min_seconds)``
    picks a block size (its estimation runs are untimed warm-up too) and times blocks until
    ``min_seconds`` were timed; more single-step blocks follow until at least ``steps`` steps
    were timed. The Timer runs with this process's torch thread count (its default is one
    thread, which would not be the loop's speed), and synchronises CUDA around each block.

    The Timer reads one clock (wall time), so the CPU time of a step needs its own
    measurement: the process CPU clock is read around the whole Timer run and divided by the
    number of steps it ran, estimation steps included (the same steps, after the warm-up). On a
    CPU shared with other jobs, wall time grows with their load; CPU time much less.

    The module's parameters change; callers that need them back restore them.

    Args:
        fabric: a launched Fabric (device, precision).
        module: a configured method (task set, on ``fabric.device``).
        batch: ``(inputs, labels)``: pixels ``[B, 3, H, W]`` or cached features ``[B, D]``.
        steps: at least this many timed steps (>= 1).
        warmup: untimed steps first (allocator and kernel warm-up).
        min_seconds: the Timer's ``min_run_time``.
        step_fn: replaces ``local_step`` (same signature), e.g. a
            :class:`~flora_lightning.privacy.dpsgd.DPSGDStep`. None: the plain step.
        capture: a :class:`~flora_lightning.federation.step_capture.CompiledStep`: the plain
            step compiled (or captured in CUDA graphs), as ``LocalTrainer`` runs it with
            ``trainer.compile``/``cuda_graphs``; its compilation happens in the warm-up.
    """
    import torch
    from torch.utils.benchmark import Measurement, Timer

    from flora_lightning.federation.local_trainer import captured_step, local_step

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0 (got {steps}, {warmup}).")
    batch = fabric.to_device(batch)
    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    if step_fn is None and capture is not None:
        one_step = captured_step(capture, fabric, module, optimizer)
    else:
        plain = step_fn or local_step

        def one_step(batch, batch_idx: int):
            return plain(fabric, module, optimizer, batch, batch_idx)

    ran = 0  # steps run so far

    def step() -> None:
        nonlocal ran
        one_step(batch, ran).item()
        ran += 1

    module.train()
    try:
        for _ in range(warmup):
            step()
        ran_before = ran
        timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
        cpu_start = time.process_time()
        measurement = timer.blocked_autorange(min_run_time=min_seconds)
        extra = []
        while len(measurement.times) * measurement.number_per_run + len(extra) < steps:
            extra.append(timer.timeit(1))
        cpu = time.process_time() - cpu_start
        timer_steps = ran - ran_before
        timed = len(measurement.times) * measurement.number_per_run + len(extra)
        timed_seconds = sum(measurement.raw_times) + sum(m.raw_times[0] for m in extra)
        if extra:
            (measurement,) = Measurement.merge([measurement, *extra])
    finally:
        module.eval()
    return StepTiming(
        seconds=measurement.median,
        cpu_seconds=cpu / timer_steps,
        timed_steps=timed,
        timed_seconds=timed_seconds,
        block_seconds=list(measurement.times),
    )
