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


def plot_confusion(ax, matrix, class_names: list[str], title: str):
    """Colour: the share of each true class (row) predicted as each class, so a small class's errors
    show as plainly as a large one's; text: the counts. Returns the image, for a colour bar."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black",
                fontsize=8)
    return image


def confusion_figure(path: Path, matrices: dict[str, list], class_names: list[str], note: str = "") -> None:
    """One or more confusion matrices side by side (the paper's Fig. 9); note (e.g. that the matrices
    are summed over seeds) goes under them."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices) + 1.6, 4.8), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        image = plot_confusion(ax, matrix, class_names, title)
        if ax is not axes[0, 0]:
            ax.set_ylabel("")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the true class (row)")
    if note:  # one "predicted" for all panels, the note under it
        for ax in axes[0]:
            ax.set_xlabel("")
        fig.supxlabel(f"predicted\n{note}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
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


def learning_curves(path: Path, histories: list[list[dict]], test_accuracy: float | None, title: str,
                    best_epochs: list[int], num_classes: int) -> None:
    """Train/val accuracy and loss per epoch (the paper's Fig. 7/8): of one run, or the mean over seeds
    with a band from the lowest to the highest seed. Marked: the epoch whose checkpoint was kept (per
    seed), the backbone-frozen epochs, chance level and the test result."""
    frame = pd.DataFrame([row for history in histories for row in history]).groupby("epoch")
    mean, low, high = frame.mean(numeric_only=True), frame.min(numeric_only=True), frame.max(numeric_only=True)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style, colour in (("train", "-", "C0"), ("val", "--", "C1")):
        for ax, measure in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            column = f"{split}_{measure}"
            ax.plot(mean.index, mean[column], style, color=colour,
                    label=split if len(histories) == 1 else f"{split}, mean of {len(histories)} seeds")
            if len(histories) > 1:
                ax.fill_between(mean.index, low[column], high[column], color=colour, alpha=0.15, lw=0)
    acc_ax.axhline(1 / num_classes, color="grey", ls=":", lw=1, label=f"chance (1/{num_classes})")
    if test_accuracy is not None:
        acc_ax.axhline(test_accuracy, color="red", lw=0.8,
                       label=f"test {test_accuracy:.3f}" + (" (mean)" if len(histories) > 1 else ""))
    frozen = mean.index[mean["frozen"] > 0] if "frozen" in mean else []
    for ax in (acc_ax, loss_ax):
        if len(frozen):
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="grey", alpha=0.12, label="backbone frozen")
        for i, epoch in enumerate(best_epochs):
            ax.axvline(epoch, color="green", lw=0.8, ls="-.", alpha=0.7,
                       label=None if i else ("kept (best val) epoch" + ("s" if len(best_epochs) > 1 else "")))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    acc_ax.set_ylabel("accuracy")
    loss_ax.set_ylabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legible(fig, label_chars: int = 28, fontsize: int = 9) -> None:
    """Labels a reader can read on a busy figure (Optuna's search plots, for search.search_figures):
    names shortened to label_chars (both ends kept), slanted x tick labels, and a width of at least
    1.6 inches per labelled axis, so neighbouring labels do not run into each other."""
    def short(text: str) -> str:
        return text if len(text) <= label_chars else text[:label_chars // 2 - 1] + "…" + text[-(label_chars // 2):]

    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax in axes:
        ax.set_xlabel(short(ax.get_xlabel()), fontsize=fontsize)
        ax.set_ylabel(short(ax.get_ylabel()), fontsize=fontsize)
        texts = [t.get_text() for t in ax.get_xticklabels()]
        if any(len(t) > label_chars and "$" not in t for t in texts):  # names (not numbers) too long to fit
            ax.set_xticks(ax.get_xticks(), [short(t) for t in texts])
        for label in ax.get_xticklabels():
            label.set(rotation=30, ha="right", fontsize=fontsize - 1)
        ax.tick_params(axis="y", labelsize=fontsize - 1)
        ax.title.set_fontsize(fontsize + 1)
    width, height = fig.get_size_inches()
    fig.set_size_inches(max(width, 1.6 * len(axes)), height)


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
    best = [result["best_epoch"]] if "best_epoch" in result else []
    learning_curves(run_dir / "learning_curves.png", [history], result.get("accuracy"), run_dir.name, best,
                    len(class_names))


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
