"""Plots of a run's history."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence


def plot_history(history: Sequence[dict[str, Any]], path: str | Path | None = None):
    """One panel per metric (loss, accuracy, ...): train and held-out values (``test_``,
    ``valid_``) against the epoch.

    Returns a ``matplotlib.figure.Figure`` and writes it as a PNG to ``path`` if given. As a
    notebook cell's last expression the figure shows as the plot, in a fresh kernel too (it
    renders itself as a PNG), and it never changes matplotlib's backend.
    """
    names = sorted({k.split("_", 1)[1] for k in history[0] if k.startswith("train_")})
    splits = ["train"] + sorted({k.split("_", 1)[0] for k in history[0] if "_" in k
                                 and k.split("_", 1)[1] in names} - {"train"})
    fig = _inline_figure()(figsize=(5 * len(names), 3.5))
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


@functools.lru_cache(maxsize=None)
def _inline_figure() -> type:
    """A ``Figure`` that a notebook shows as a PNG (IPython calls ``_repr_png_``) whether or not
    matplotlib's inline backend is set up."""
    from matplotlib.figure import Figure

    class HistoryFigure(Figure):
        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return HistoryFigure

