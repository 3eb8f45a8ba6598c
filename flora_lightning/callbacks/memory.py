"""``MemoryProfiler``: the peak memory of each client's local fit.

What is measured depends on where the model trains:

- **CUDA**: the caching allocator's peak, ``torch.cuda.max_memory_allocated()``, after
  ``torch.cuda.reset_peak_memory_stats()`` at the start of the fit (``memory_measure`` is
  ``cuda_max_memory_allocated``). Growth is over ``memory_allocated()`` at the start.
- **CPU**: the peak resident set size (RSS) of the process during the fit. Linux keeps a
  high-water mark of the RSS (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
  ``/proc/self/clear_refs`` resets it to the current RSS (Linux >= 4.0), so ``VmHWM`` read at
  the end is the peak of the fit alone (``cpu_peak_rss``). Growth is over ``VmRSS`` at the start.
  Where ``clear_refs`` cannot be written (not Linux, a locked-down container), the fallback is
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the peak since the *process* started, an upper
  bound of the fit's peak (``cpu_peak_rss_since_process_start``); a warning says so once.

RSS counts what the operating system gave the process, so memory the allocator freed but kept
(glibc's heap, CUDA's cache) still counts; :func:`release_free_memory` hands it back first when
a caller wants to measure from a clean start (``flora bench`` does).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_lightning.callbacks.base import Callback

log = logging.getLogger(__name__)
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class MemoryReading:
    """One measured window: peak bytes, bytes in use at its start, and how the peak was read."""

    peak_bytes: int
    start_bytes: int
    measure: str

    @property
    def growth_bytes(self) -> int:
        """Peak minus what was already in use when the window started."""
        return max(self.peak_bytes - self.start_bytes, 0)


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not let us."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


def _max_rss_since_start() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_free_memory() -> None:
    """Collect garbage and give freed memory back (glibc ``malloc_trim``, CUDA's cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


class PeakMemoryMeter:
    """Peak memory between :meth:`start` and :meth:`stop` on one device.

    Args:
        device: where the model trains; ``cuda`` devices use the CUDA allocator's peak,
            everything else the process's peak RSS.
    """

    _warned = False

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._start = 0
        self._hwm_reset = False

    @property
    def measure(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "cpu_peak_rss" if self._hwm_reset else "cpu_peak_rss_since_process_start"

    def current_bytes(self) -> int:
        """In use now: CUDA ``memory_allocated``, or the process's RSS (0 if unreadable)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return status_kib("VmRSS") or 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = self.current_bytes()
            return
        self._start = self.current_bytes()
        self._hwm_reset = _reset_rss_high_water_mark()
        if not self._hwm_reset and not PeakMemoryMeter._warned:
            PeakMemoryMeter._warned = True
            log.warning(
                "MemoryProfiler: /proc/self/clear_refs is not writable here, so the CPU peak "
                "is ru_maxrss, the peak since the process started (an upper bound)."
            )

    def stop(self) -> MemoryReading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm_reset:
            peak = status_kib("VmHWM") or _max_rss_since_start()
        else:
            peak = _max_rss_since_start()
        return MemoryReading(
            peak_bytes=int(peak), start_bytes=int(self._start), measure=self.measure
        )


class MemoryProfiler(Callback):
    """Logs the peak memory of every client's local fit (see the module docstring for how).

    Per client, to TensorBoard at step ``round``: ``memory/client_{id}_peak_bytes`` and
    ``memory/client_{id}_growth_bytes``. Per round record: ``peak_memory_bytes`` and
    ``peak_memory_growth_bytes`` (max over the round's clients) and
    ``client_peak_memory_bytes``. Summary: ``peak_memory_bytes`` and
    ``peak_memory_growth_bytes`` (max over all rounds, resumed ones included) and
    ``memory_measure`` (``cuda_max_memory_allocated`` or ``cpu_peak_rss``).
    """

    def __init__(self) -> None:
        self.meter: PeakMemoryMeter | None = None
        self.readings: dict[int, MemoryReading] = {}

    def on_fit_start(self, loop, model) -> None:
        self.meter = PeakMemoryMeter(loop.fabric.device)

    def on_round_start(self, loop, round: int, clients: list[int]) -> None:
        self.readings = {}

    def on_client_fit_start(self, loop, model, client_id: int) -> None:
        if self.meter is None:
            self.meter = PeakMemoryMeter(loop.fabric.device)
        self.meter.start()

    def on_client_fit_end(self, loop, model, update) -> None:
        reading = self.meter.stop()
        self.readings[update.client_id] = reading
        prefix = f"memory/client_{update.client_id}"
        loop.fabric.log_dict(
            {
                f"{prefix}_peak_bytes": reading.peak_bytes,
                f"{prefix}_growth_bytes": reading.growth_bytes,
            },
            step=loop.round,
        )

    def round_fields(self, loop, record) -> dict:
        if not self.readings:  # round 0 is evaluation only
            return {}
        return {
            "peak_memory_bytes": max(r.peak_bytes for r in self.readings.values()),
            "peak_memory_growth_bytes": max(r.growth_bytes for r in self.readings.values()),
            "client_peak_memory_bytes": {
                str(c): r.peak_bytes for c, r in sorted(self.readings.items())
            },
        }

    def summary_fields(self, loop, summary: dict) -> dict:
        rows = [r for r in summary["rounds"] if "peak_memory_bytes" in r]
        if not rows:
            return {}
        return {
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows),
            "peak_memory_growth_bytes": max(r["peak_memory_growth_bytes"] for r in rows),
            "memory_measure": self.meter.measure if self.meter else "unknown",
        }
