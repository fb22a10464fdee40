"""Ensembles of trained runs: the weighted mean of their softmax probabilities.

    orestudy ensemble runs/A runs/B runs/C --output runs/ensemble_ABC

The members must share one split (the same data and split seed); they are refused otherwise. Their
weights are chosen on the validation split alone, by greedy forward selection with replacement
(Caruana et al. 2004, "Ensemble selection from libraries of models"): each round adds the member
that makes the running mean most accurate, and the best round's counts are the weights. Then the test
split is scored once. Every run's predictions.csv holds its per-image validation and test
probabilities, so nothing is recomputed. The output folder is a model that `predict --model` takes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(prog=cli.prog("ensemble"), description=__doc__)
    parser.add_argument("members", nargs="+", metavar="RUN_DIR", help="finished run folders on one split")
    parser.add_argument("--output", required=True, type=Path, help="the ensemble's folder")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                        help="log the ensemble as an MLflow run, naming its members' runs")
    parser.add_argument("--runs", default="runs", help="the runs folder, whose MLflow store (RUNS/mlflow.db) "
                                                       "receives the run, unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--experiment", default="orestudy", help="MLflow experiment (the members' by default)")
    args = parser.parse_args(argv)
    from ..run.ensembling import build_ensemble, log_run  # torch loads only when an ensemble is built

    try:
        spec = build_ensemble(args.members, args.output)
    except ValueError as err:
        parser.error(str(err))
    weights = ", ".join(f"{m} {w:.2f}" for m, w in zip(spec["members"], spec["weights"]) if w > 0)
    where = f"{args.output}"
    if args.mlflow:
        where += f", MLflow run {log_run(args.runs, args.experiment, args.output, spec)}"
    print(f"weights (chosen on validation): {weights}\nvalidation accuracy {spec['val_accuracy']:.4f}, test accuracy "
          f"{spec['test_accuracy']:.4f}, macro-F1 {spec['test_macro_f1']:.4f} -> {where}", file=sys.stderr)
    return spec


if __name__ == "__main__":
    main()
