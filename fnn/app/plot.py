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



def image_grid(images: Any, *, data_range: Sequence[float], columns: int | None = None,
               scale: int = 4, gap: int = 1) -> Any:
    """A grid of images ``[N, H, W, C]`` (C 1 or 3, values in ``data_range``) as one ``uint8``
    picture ``[rows * (H * scale + gap) + gap, ..., C]``: ``columns`` per row (default: the
    square root of N, rounded up), each image enlarged ``scale`` times (nearest neighbour) and
    separated by ``gap`` pixels of the lowest value. Values outside the range are clipped."""
    import numpy as np

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(f"image_grid: expected images [N, H, W, 1 or 3], got shape "
                         f"{images.shape}")
    low, high = (float(v) for v in data_range)
    if not high > low:
        raise ValueError(f"image_grid: data_range must have low < high, got {data_range!r}")
    n, h, w, c = images.shape
    columns = int(np.ceil(np.sqrt(n))) if columns is None else columns
    if columns <= 0:
        raise ValueError(f"image_grid: columns must be positive, got {columns}")
    rows = -(-n // columns)
    pixels = np.round((np.clip(images, low, high) - low) / (high - low) * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.zeros((rows * cell_h + gap, columns * cell_w + gap, c), np.uint8)
    for i, image in enumerate(pixels):
        top, left = gap + (i // columns) * cell_h, gap + (i % columns) * cell_w
        grid[top:top + h * scale, left:left + w * scale] = image
    return grid


def save_image_grid(images: Any, path: str | Path, *, data_range: Sequence[float],
                    columns: int | None = None, scale: int = 4) -> Path:
    """:func:`image_grid` written as a PNG to ``path`` (written whole: a reader never sees a
    part); returns the path."""
    import os

    from PIL import Image

    grid = image_grid(images, data_range=data_range, columns=columns, scale=scale)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
