"""The PNG plots a run writes leave the caller's matplotlib as it was: a notebook that trains a
model keeps its backend and its current figure."""

import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from hw2jax.tasks import mqar
from hw2jax.train import plots

HISTORY = {
    "train": [{"step": s, "loss": 2.0 / s} for s in (2, 4, 6)],
    "epochs": [
        {"step": 3 * e, "epoch": e, "test_loss": 1.0 / e, "test_accuracy": 0.5 + e / 10}
        for e in (1, 2)
    ],
}


@pytest.fixture
def users_matplotlib():
    """A caller (a notebook, say) that plots with its own backend and has a figure open."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    figure = plt.figure()
    yield figure
    plt.close(figure)
    matplotlib.use(before)


def test_every_plot_is_written_without_touching_the_callers_backend_or_figures(
    users_matplotlib, tmp_path
):
    names = [f"class {i}" for i in range(3)]
    rng = np.random.default_rng(0)
    plots.plot_history(HISTORY, "test", tmp_path / "curves.png")
    plots.plot_comparison({"a": HISTORY, "b": HISTORY}, "test", tmp_path / "both.png")
    plots.plot_confusion(rng.integers(0, 9, (3, 3)), names, tmp_path / "confusion.png")
    images = rng.random((5, 28, 28))
    plots.plot_predictions(
        images, np.array([0, 1, 2, 0, 1]), np.array([0, 1, 1, 0, 2]), names, tmp_path / "p.png"
    )
    rows = [
        {"mixer": m, "seq_len": 64, "num_pairs": 4, "state_size": s, "test_accuracy": a}
        for m in ("softmax", "linear")
        for s, a in ((32, 0.25), (64, 0.5))
    ]
    mqar.plot_recall(rows, tmp_path / "recall.png")

    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == [users_matplotlib.number]
    assert plt.gcf() is users_matplotlib
    # Each is a PNG of its figure's size at 110 dots per inch.
    for name, (height, width) in {
        "curves.png": (440, 1210),
        "both.png": (440, 1210),
        "confusion.png": (715, 825),
        "recall.png": (396, 440),
    }.items():
        assert matplotlib.image.imread(tmp_path / name).shape == (height, width, 4), name
    assert matplotlib.image.imread(tmp_path / "p.png").shape[1] == 8 * 1.6 * 110
