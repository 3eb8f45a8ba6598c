"""Accuracy-per-round plots of a sweep (matplotlib, headless).

matplotlib is an optional dependency (the ``plots`` extra, in ``dev`` too): ``flora fit`` does
not need it. Without it, :func:`plot_accuracy` raises :class:`PlotsNotInstalledError` naming
the extra to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOTS_EXTRA = 'pip install "flora-lightning[plots]"'


class PlotsNotInstalledError(ModuleNotFoundError):
    """matplotlib, needed for plots, is not installed."""


def require_pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, or a clear error naming the extra.

    Raises:
        PlotsNotInstalledError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise PlotsNotInstalledError(
            f"Plots need matplotlib, an optional dependency of flora-lightning: {PLOTS_EXTRA} "
            f"(or pip install matplotlib). ({err})"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_curve(summaries: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean and standard deviation (n - 1; 0 for one run) of test accuracy per round.

    Only the rounds every summary reached count, so a partial seed does not bend the curve.
    """
    length = min(len(s["rounds"]) for s in summaries)
    rounds = np.array([r["round"] for r in summaries[0]["rounds"][:length]])
    acc = np.array([[r["test_acc"] for r in s["rounds"][:length]] for s in summaries])
    std = acc.std(axis=0, ddof=1) if len(summaries) > 1 else np.zeros(length)
    return rounds, acc.mean(axis=0), std


def plot_accuracy(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """One line per method (mean over its seeds' summaries), ± one std shaded; saves a PNG."""
    plt = require_pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, summaries in runs.items():
        if not summaries:
            continue
        rounds, mean, std = accuracy_curve(summaries)
        label = f"{method} (n={len(summaries)})" if len(summaries) > 1 else method
        (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=label)
        if len(summaries) > 1:
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (top-1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
