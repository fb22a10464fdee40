"""Evaluate a trained model on any folder of class sub-folders, the way a run tests its own split.

    orestudy val --model runs/<run name> --data photos/
    orestudy val --model runs:/<mlflow run id> --data photos/ --output runs/val/photos --no-mlflow

Class sub-folders are matched to the model's classes by name: a class the model does not know is an
error, a model class the folder lacks is reported with support 0. Unreadable files are listed and left
out. Writes metrics.json (accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix)
and confusion_matrix.png (counts and row shares) to --output, logs them as an MLflow run (experiment
"orestudy-val") and prints the per-class table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli


def default_output(model: str, data: Path) -> Path:
    """runs/val/<run>-<data folder>: the run folder's (or MLflow run's) name beside the data's."""
    source = model.rstrip("/")
    name = source.split(":/")[-1].split("/")[0] if ":/" in source else Path(source).resolve().name
    if name.endswith(".pt"):
        name = Path(source).resolve().parent.name
    return Path("runs/val") / f"{name}-{data.resolve().name}"


def default_runs(model: str) -> str:
    """The MLflow store a validation goes to: the one train put beside the model's run folder (which holds
    best.pt), wherever val is started; ./runs for an MLflow URI, which it resolves."""
    if model.startswith(("runs:/", "models:/")):
        return "runs"
    path = Path(model).resolve()
    run_dir = path.parent if path.suffix == ".pt" else path
    return str(run_dir.parent)


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(prog=cli.prog("val"), description=__doc__)
    p.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="run folder, checkpoint file, or MLflow URI (runs:/<id>, models:/<name>/<version>)")
    p.add_argument("--data", required=True, type=Path, metavar="FOLDER", help="image folder with one sub-folder per class")
    p.add_argument("--output", type=Path, help="folder for metrics.json and confusion_matrix.png "
                                               "(default: runs/val/<run>-<data folder>)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N; auto: CUDA when present")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16")
    p.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True, help="log the result as an MLflow run")
    p.add_argument("--runs", help="folder whose mlflow.db resolves MLflow URIs and receives the run, unless "
                                  "MLFLOW_TRACKING_URI is set (default: runs for an MLflow URI; else the store of "
                                  "the model's run, the folder holding its run folder)")
    p.add_argument("--experiment", default="orestudy-val", help="MLflow experiment")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    args.runs = args.runs or default_runs(args.model)
    from .. import device as devices  # torch loads only when a validation runs
    from ..run import reports, validation

    if args.model.startswith(("runs:/", "models:/")):
        from .. import tracking

        tracking.use_store(args.runs)
    devices.set_threads(args.threads)
    try:
        device = devices.pick_device(args.device)
        metrics = validation.validate(args.model, args.data, args.batch_size, device,
                                      devices.pick_precision(args.precision, device), sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    output = args.output or default_output(args.model, args.data)
    files = validation.write_report(output, metrics)
    where = f"{output}"
    if args.mlflow:
        where += f", MLflow run {validation.log_run(args.runs, args.experiment, output, metrics)}"
    print(f"{args.model} on {args.data} ({metrics['n_images']} images, {len(metrics['unreadable_files'])} "
          f"unreadable):\n{reports.per_class_table(metrics)}")
    print(f"wrote {', '.join(f.name for f in files)} -> {where}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    main()
