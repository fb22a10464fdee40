"""Reports: run folders' files, tables as Markdown, and the figures people would rather see than read."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_confusion(ax, matrix, class_names: list[str], title: str, normalize: bool = False):
    """Counts in the cells; with normalize, coloured by each true class's share (rows sum to 1, a class
    with no images stays blank) and the share written above the count. Returns the image, for a colour bar."""
    matrix = np.asarray(matrix)
    support = matrix.sum(1, keepdims=True)
    colours = matrix / np.maximum(support, 1) if normalize else matrix
    image = ax.imshow(colours, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        text = f"{colours[i, j]:.2f}\n{value}" if normalize and support[i, 0] else str(value)
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="white" if colours[i, j] > colours.max() / 2 else "black")
    return image


def confusion_figure(path: Path, matrices: dict[str, list], class_names: list[str]) -> None:
    """One or more confusion matrices side by side (the paper's Fig. 9)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 4.6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        plot_confusion(ax, matrix, class_names, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def counts_and_shares_figure(path: Path, matrix, class_names: list[str], title: str) -> None:
    """A confusion matrix twice: counts, and each true class's row normalised to shares (its recall on
    the diagonal), with a colour bar, so small classes read as clearly as large ones."""
    fig, (counts, shares) = plt.subplots(1, 2, figsize=(11, 4.8))
    plot_confusion(counts, matrix, class_names, "counts")
    fig.colorbar(plot_confusion(shares, matrix, class_names, "share of each true class", normalize=True),
                 ax=shares, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_class_table(metrics: dict) -> str:
    """Per-class precision, recall, F1 and support as a terminal table, closed by the macro average and
    the accuracy: sklearn's classification_report, from metrics already computed (classification_metrics)."""
    rows = metrics["per_class"]
    width = max(12, *map(len, rows))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    lines += [f"{name:<{width}} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>9d}"
              for name, m in rows.items()]
    total = sum(m["support"] for m in rows.values())
    macro = {key: np.mean([m[key] for m in rows.values()]) for key in ("precision", "recall")}
    lines += ["", f"{'macro avg':<{width}} {macro['precision']:>9.4f} {macro['recall']:>9.4f} "
                  f"{metrics['macro_f1']:>9.4f} {total:>9d}",
              f"{'accuracy':<{width}} {'':>9} {'':>9} {metrics['accuracy']:>9.4f} {total:>9d}"]
    return "\n".join(lines)


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


def write_predictions(path: Path, predictions: list[list], class_names: list[str]) -> None:
    """evaluation.per_image rows as CSV: split, sha256, label, predicted, confidence, one column per class."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "sha256", "label", "predicted", "confidence", *(f"p_{c}" for c in class_names)])
        for split, sha, label, probs in predictions:
            top = int(np.argmax(probs))
            writer.writerow([split, sha, class_names[label], class_names[top], probs[top], *probs])


def write_run_report(run_dir: Path, history: list[dict], result: dict, class_names: list[str]) -> None:
    result = dict(result)
    write_predictions(run_dir / "predictions.csv", result.pop("predictions", []), class_names)
    with (run_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if "confusion_matrix" in result:  # a run that did not evaluate the test split has none
        confusion_figure(run_dir / "confusion_matrix.png", {f"test accuracy {result['accuracy']:.3f}":
                                                            result["confusion_matrix"]}, class_names)
    learning_curves(run_dir / "learning_curves.png", history, result.get("accuracy"), run_dir.name)


# ---------------------------------------------------------------------------------------------------
# Studies: one cell's runs over seeds, summarised, and tables as Markdown

def curation_lines(metrics: list[dict]) -> list[str]:
    """A report's statement of the curations its runs' data had (metrics: the runs' results), if any."""
    curations = {json.dumps(m["curation"], sort_keys=True) for m in metrics if m.get("curation")}
    return ["", *[f"**Curated data** ({c['file']}, curation {c['sha256'][:10]}): {c['excluded']} images excluded, "
                  f"{c['relabelled']} relabelled. Accuracies are on the curated test split; each run's "
                  f"test_full_accuracy is on the published one." for c in map(json.loads, sorted(curations))]
            ] if curations else []


def markdown_table(frame: pd.DataFrame) -> str:
    text = frame.astype(str).map(lambda s: s.replace("|", "\\|"))
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in text.itertuples(index=False)])


def seed_comparison_figure(path: Path, accuracies: dict[str, dict[int, float]]) -> None:
    """Test accuracy per seed of a few configurations side by side: a point per seed, a line joining
    the same seed (split) across configurations, the mean ± one standard deviation in black. Whether
    a difference holds split by split shows at a glance."""
    labels = list(accuracies)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(labels), 4))
    for seed in sorted({s for per_seed in accuracies.values() for s in per_seed}):
        xs = [i for i, label in enumerate(labels) if seed in accuracies[label]]
        ax.plot(xs, [accuracies[labels[i]][seed] for i in xs], "o-", color="grey", alpha=0.5, lw=0.8, ms=4)
        ax.annotate(str(seed), (xs[-1], accuracies[labels[xs[-1]]][seed]), textcoords="offset points",
                    xytext=(6, -3), fontsize=7, color="grey")
    for i, label in enumerate(labels):
        values = np.array(list(accuracies[label].values()))
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        ax.errorbar(i, values.mean(), yerr=std, fmt="_", ms=28, capsize=6, color="black")
        ax.annotate(f"{values.mean():.3f}", (i, values.mean()), textcoords="offset points", xytext=(-40, -3), fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.7, len(labels) - 0.3)
    ax.set_ylabel("test accuracy (one test split per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
