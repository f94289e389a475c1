"""``plot_history``: one panel per metric with the train and held-out curves, written as a PNG."""

from fnn.app import plot_history


def test_plot_history_draws_one_panel_per_metric_and_writes_a_png(tmp_path):
    history = [{"step": 10 * e, "epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + e / 10,
                "test_loss": 1.2 / e, "test_accuracy": 0.4 + e / 10, "skipped": 0,
                "seconds": float(e)} for e in (1, 2, 3)]
    fig = plot_history(history, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["accuracy", "loss"]
    loss = fig.axes[1]
    assert [line.get_label() for line in loss.get_lines()] == ["train", "test"]
    assert list(loss.get_lines()[1].get_ydata()) == [row["test_loss"] for row in history]


def test_the_figure_renders_itself_in_a_fresh_notebook_kernel():
    # IPython shows an object by its _repr_png_ whether or not matplotlib's inline backend is on
    history = [{"step": 1, "epoch": 1, "train_loss": 1.0, "test_loss": 1.1}]
    png = plot_history(history)._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
