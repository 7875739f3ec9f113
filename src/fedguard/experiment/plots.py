"""PNG plots of a run: metrics and privacy spent per round, the partition's label histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def metric_plot(
    rows: list[dict[str, Any]], keys: list[str], ylabel: str, title: str, path: Path
) -> None:
    """Line plot of ``keys`` against the round number (missing values are skipped)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, marker="o", markersize=3, label=key)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def partition_plot(histogram: list[list[int]], class_names: list[str], path: Path) -> None:
    """Stacked bars: how many samples of each class every client holds."""
    clients = len(histogram)
    fig, ax = plt.subplots(figsize=(max(6, min(0.25 * clients, 20)), 4))
    bottom = [0] * clients
    for c, name in enumerate(class_names):
        counts = [row[c] for row in histogram]
        ax.bar(range(clients), counts, bottom=bottom, label=name, width=0.85)
        bottom = [b + v for b, v in zip(bottom, counts, strict=True)]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_title("Label distribution per client")
    if len(class_names) <= 20:
        ax.legend(fontsize="small", ncol=min(len(class_names), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_plots(rows: list[dict[str, Any]], plots_dir: Path) -> None:
    """The standard per-round plots of a run folder."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    metric_plot(
        rows,
        ["test_accuracy", "test_auc", "federated_accuracy"],
        "accuracy / ROC AUC",
        "Accuracy and ROC AUC per round",
        plots_dir / "accuracy.png",
    )
    metric_plot(
        rows,
        ["test_loss", "train_loss", "federated_loss"],
        "loss",
        "Loss per round",
        plots_dir / "loss.png",
    )
    if any(r.get("epsilon") is not None for r in rows):
        privacy_plot(rows, plots_dir / "privacy.png")


def privacy_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Epsilon spent (left axis) and test accuracy / AUC (right axis) per round."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x, eps = _series(rows, "epsilon")
    ax.plot(x, eps, color="tab:red", marker="o", markersize=3, label="epsilon")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent", color="tab:red")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for key in ("test_accuracy", "test_auc"):
        xs, ys = _series(rows, key)
        if xs:
            right.plot(xs, ys, marker="s", markersize=3, label=key)
    right.set_ylabel("accuracy / ROC AUC")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="lower right")
    ax.set_title("Privacy spent and accuracy per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_plot(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    """The confusion matrix of the final model (rows: true class, columns: predicted)."""
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), class_names)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (final model)")
    peak = max((max(row) for row in matrix), default=0)
    if n <= 20:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                color = "white" if value > peak / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contributions_plot(cumulative: dict[str, float], path: Path) -> None:
    """A column per client: its cumulative contribution score (negative ones below the axis)."""
    clients = sorted(cumulative, key=int)
    values = [cumulative[c] for c in clients]
    fig, ax = plt.subplots(figsize=(max(6, min(0.35 * len(clients), 20)), 4))
    colours = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    ax.bar(range(len(clients)), values, color=colours, width=0.8)
    ax.set_xticks(range(len(clients)), clients, fontsize="small")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("client")
    ax.set_ylabel("cumulative score")
    ax.set_title("Contribution per client")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
