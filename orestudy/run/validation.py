"""Validation of a trained model on any folder of class sub-folders, the way a run tests its own split.

    metrics = validate("runs/<run>", "photos/")   # accuracy, macro-F1, per-class scores, confusion matrix

The model's preprocessing (input size, resize, centre crop, mean/std) comes from its checkpoint and the
forward pass is evaluation.evaluate, the one path of every run's validation and test, so on a run's
own test images it gives the run's own test numbers.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data
from . import prediction, reports
from .evaluation import batches, classification_metrics, evaluate, per_image


def labels_of(records: list[data.ImageRecord], class_names: list[str], root: Path) -> list[int]:
    """Each image's class index in the model's classes; a folder class the model does not know is an
    error naming them (a model class the folder lacks is fine: its support is 0)."""
    unknown = sorted({r.label for r in records} - set(class_names))
    if unknown:
        raise ValueError(f"{root} has classes the model does not know: {', '.join(unknown)} "
                         f"(the model's classes: {', '.join(class_names)})")
    return [class_names.index(r.label) for r in records]


def seen_in_training(source: str, records: list[data.ImageRecord]) -> dict[str, int]:
    """How many of records (by content) the model's run trained on and selected on: the train and val
    rows of the split.csv beside its checkpoint; {} where there is none (an MLflow URI, a lone file)."""
    path = Path(source)
    manifest = (path if path.is_dir() else path.parent) / "split.csv"
    if not manifest.is_file():
        return {}
    shas = {r.sha256 for r in records}
    with manifest.open(newline="", **data.MANIFEST_ENCODING) as f:
        used = [row["split"] for row in csv.DictReader(f) if row["sha256"] in shas]
    return {split: used.count(split) for split in ("train", "val") if split in used}


def validate(source: str, root: str | Path, batch_size: int = 32, device: torch.device = torch.device("cpu"),
             dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Metrics of the model at source (run folder, checkpoint or MLflow URI) on the images under
    root/<class>/; unreadable files are reported and left out."""
    root = Path(root)
    model, meta = prediction.load_model(source, device, dtype)  # first: a wrong --model fails at once
    records, bad = data.scan_folder(root, progress)
    for b in bad:
        print(f"skipping unreadable image {b.path}: {b.reason}", file=sys.stderr)
    names, size = meta["class_names"], meta["input_size"]
    labels = labels_of(records, names, root)
    seen = seen_in_training(source, records)
    if seen:
        print(f"warning: {' and '.join(f'{n} in its {s} split' for s, n in seen.items())} of the {len(records)} "
              f"photos in {root} were the model's own (same content): its scores here overstate how it does on "
              f"new photos", file=sys.stderr)

    def inputs(recs):
        return data.normalize(torch.stack([prediction.eval_input(r.path, size) for r in recs]), meta["mean"],
                              meta["std"])

    result = evaluate(model, batches(records, labels, batch_size, inputs), device, dtype)
    return {**classification_metrics(result.labels, result.predictions, names), "loss": result.loss,
            "predictions": per_image(root.name, records, result),
            "n_images": len(records), "seen_in_training": seen, "unreadable_files": [asdict(b) for b in bad],
            "model": source, "data": str(root.resolve()), "input_size": size,
            "precision": str(dtype or "fp32"), "device": str(device)}


def write_report(output: Path, metrics: dict) -> list[Path]:
    """metrics.json, predictions.csv (per image, as a run's: its "split" is the data folder's name) and
    confusion_matrix.png (counts and row shares) in output; returns the files."""
    output.mkdir(parents=True, exist_ok=True)
    files = [output / "metrics.json", output / "predictions.csv", output / "confusion_matrix.png"]
    files[0].write_text(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}, indent=2))
    reports.write_predictions(files[1], metrics["predictions"], metrics["class_names"])
    title = (f"{Path(metrics['data']).name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
             f"(n = {metrics['n_images']})")
    reports.confusion_figure(files[2], {title: metrics["confusion_matrix"]}, metrics["class_names"])
    return files


def log_run(runs: str | Path, experiment: str, output: Path, metrics: dict) -> str:
    """The validation as one MLflow run (in runs/mlflow.db unless MLFLOW_TRACKING_URI is set): what was
    validated on what, the scores overall and per class, and the report's files; returns its id."""
    from .. import tracking  # mlflow is slow to import

    params = {key: metrics[key] for key in ("model", "data", "input_size", "precision", "device", "n_images")}
    scores = {key: metrics[key] for key in ("accuracy", "macro_f1", "loss")}
    for name, per_class in metrics["per_class"].items():
        scores.update({f"{key}_{name}": float(value) for key, value in per_class.items() if key != "support"})
    return tracking.log_folder(runs, experiment, f"val-{output.name}", params, scores, output)
