"""PNG plots written into the work dir (matplotlib, no screen needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hw2jax.train.sharding import is_main_process


def new_figure(figsize: tuple[float, float]):
    """A figure drawn by Agg that pyplot never sees: the caller's backend and pyplot's open
    figures stay as they were (a notebook that trains a model goes on plotting inline), and
    nothing needs closing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    if is_main_process():  # one writer when several processes share the work dir
        fig.savefig(path, dpi=110)


def plot_history(history: dict[str, Any], eval_split: str, path: Path) -> None:
    """Train loss every logged step and eval loss per epoch; eval accuracy per epoch."""
    fig = new_figure((11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    train = history["train"]
    epochs = history["epochs"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (per log)")
    ax_loss.plot(
        [r["step"] for r in epochs],
        [r[f"{eval_split}_loss"] for r in epochs],
        "o-",
        label=f"{eval_split} (per epoch)",
    )
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(
        [r["epoch"] for r in epochs], [100 * r[f"{eval_split}_accuracy"] for r in epochs], "o-"
    )
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{eval_split} accuracy")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_comparison(histories: dict[str, dict[str, Any]], eval_split: str, path: Path) -> None:
    """Several runs on one figure: train loss per logged step and eval accuracy per epoch."""
    fig = new_figure((11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, history in histories.items():
        train, epochs = history.get("train", []), history.get("epochs", [])
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        ax_acc.plot(
            [r["epoch"] for r in epochs],
            [100 * r[f"{eval_split}_accuracy"] for r in epochs],
            "o-",
            label=name,
        )
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="train loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{eval_split} accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    fig = new_figure((7.5, 6.5))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    for (i, j), count in np.ndenumerate(cm):
        color = "white" if count > cm.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"confusion matrix, accuracy {100 * np.trace(cm) / cm.sum():.2f}%",
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def plot_predictions(
    images: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    cols: int = 8,
) -> None:
    """A grid of images titled 'predicted (true)', wrong ones in red. One canvas in one axes,
    not an axes per image: drawn in a fifth of the time."""
    import matplotlib

    rows = -(-len(images) // cols)
    h, w = images.shape[1:3]
    pad, title = 3, 9  # pixels beside each image, and above it for its two-line title
    cell_h, cell_w = h + title, w + 2 * pad
    canvas = np.full((rows * cell_h, cols * cell_w), np.nan)  # NaN: drawn as the background
    fig = new_figure((1.6 * cols, 1.6 * cols * rows * cell_h / (cols * cell_w)))
    ax = fig.subplots()
    for i, (image, p, t) in enumerate(zip(images, preds, labels, strict=False)):
        y, x = (i // cols) * cell_h + title, (i % cols) * cell_w + pad
        canvas[y : y + h, x : x + w] = image.reshape(h, w)
        ax.text(
            x + w / 2,
            y - 0.5,
            f"{class_names[p]}\n({class_names[t]})",
            fontsize=7,
            ha="center",
            va="bottom",
            color="black" if p == t else "red",
        )
    ax.imshow(canvas, cmap=matplotlib.colormaps["gray"].with_extremes(bad="white"))
    ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    save_figure(fig, path)
