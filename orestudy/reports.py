"""Reports: metrics from predictions, and the figures people would rather see than read."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> dict:
    ids = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                     zero_division=0)
    return {
        "accuracy": float((labels == predictions).mean()),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "class_names": list(class_names),
    }


def plot_confusion(ax, matrix, class_names: list[str], title: str) -> None:
    matrix = np.asarray(matrix)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=8)


def confusion_figure(path: Path, matrices: dict[str, list], class_names: list[str]) -> None:
    """One or more confusion matrices side by side (the paper's Fig. 9)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 4.6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        plot_confusion(ax, matrix, class_names, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def learning_curves(path: Path, history: list[dict], test_accuracy: float | None, title: str) -> None:
    """Train/val accuracy and loss per epoch, the test result marked (the paper's Fig. 7/8)."""
    epochs = [h["epoch"] for h in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "--")):
        acc_ax.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, label=split)
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
    if test_accuracy is not None:
        acc_ax.axhline(test_accuracy, color="red", lw=0.8, label=f"test {test_accuracy:.3f}")
    frozen = [h["epoch"] for h in history if h.get("frozen")]
    for ax in (acc_ax, loss_ax):
        if frozen:
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="grey", alpha=0.12, label="backbone frozen")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend()
    acc_ax.set_ylabel("accuracy")
    loss_ax.set_ylabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_report(run_dir: Path, history: list[dict], result: dict, class_names: list[str]) -> None:
    with (run_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    confusion_figure(run_dir / "confusion_matrix.png", {f"test accuracy {result['accuracy']:.3f}":
                                                        result["confusion_matrix"]}, class_names)
    learning_curves(run_dir / "learning_curves.png", history, result["accuracy"], run_dir.name)
