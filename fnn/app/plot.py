"""Plots of a run's history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_history(history: Sequence[dict[str, Any]], path: str | Path | None = None):
    """One panel per metric (loss, accuracy, ...): train and held-out values (``test_``,
    ``valid_``) against the epoch.

    Returns the ``matplotlib.figure.Figure`` (shown inline by notebooks) and writes it as a PNG
    to ``path`` if given. It never changes matplotlib's backend.
    """
    from matplotlib.figure import Figure

    names = sorted({k.split("_", 1)[1] for k in history[0] if k.startswith("train_")})
    splits = ["train"] + sorted({k.split("_", 1)[0] for k in history[0] if "_" in k
                                 and k.split("_", 1)[1] in names} - {"train"})
    fig = Figure(figsize=(5 * len(names), 3.5))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    epochs = [row["epoch"] for row in history]
    for ax, name in zip(axes, names):
        for split in splits:
            key = f"{split}_{name}"
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
