"""Classify ore photos with a trained model.

    orestudy predict --model runs/<run name> photo.jpg folder/ ...
    orestudy predict --model runs:/<mlflow run id> --top-k 3 --tta --output predictions.csv folder/

The model is a run folder, its best.pt, or an MLflow URI (runs:/<id>, models:/<name>/<version>), whose
best.pt is fetched. Preprocessing (input size, resize, centre crop, mean/std) comes from the checkpoint,
exactly as in validation. A photo whose top-1 probability is below the checkpoint's "unknown"
threshold is answered "unknown": a 7-class model would otherwise name a rock it has never seen. The
threshold was chosen on the validation split so that, with confidence 1 - delta, the error among
answered photos is at most the target (5 % and 0.1 by default; see the checkpoint). With --coverage C,
each photo also gets a prediction set: the fewest classes that hold the true one with probability C
("malachite or chrysocolla"), calibrated on the validation split (split-conformal). Unreadable files
get a row with the error.

    orestudy predict --model runs/<run name> --coverage 0.95 --output sets.json folder/
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import cli


def argument_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=cli.prog("predict"), description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (read recursively)")
    parser.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint file, or MLflow URI (runs:/<id>, models:/<name>/<version>)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per photo, most likely first")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over the image and its horizontal and vertical flips (3x the compute); "
                             "default: as the run was evaluated (its tta choice), for which its 'unknown' "
                             "threshold and prediction sets were calibrated")
    parser.add_argument("--coverage", type=float, metavar="C",
                        help="also give each photo its prediction set: the fewest classes that hold the true one "
                             "with probability C, e.g. 0.95 (calibrated on the validation split)")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass")
    parser.add_argument("--output", type=Path, help="also write the predictions to this .csv or .json file (default: none)")
    parser.add_argument("--runs", default="runs", help="the runs folder, whose MLflow store (RUNS/mlflow.db) "
                                                       "resolves MLflow URIs, unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N; auto: CUDA when present")
    parser.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"),
                        help="fp32: the answers the MLflow model and the exported file give, to the last digit; "
                             "bf16 / auto (bf16 on CUDA and on CPUs with native bf16): faster, probabilities "
                             "differ by up to about 0.02")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    return parser


def main(argv: list[str] | None = None) -> list:
    """prediction.Prediction per file, in order."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.output is not None and args.output.suffix not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    if args.coverage is not None and not 0.0 < args.coverage < 1.0:
        parser.error(f"--coverage must be in (0, 1), got {args.coverage}")
    from ..run.prediction import CheckpointError, predict_files

    try:
        return predict_files(args.model, args.images, args.top_k, args.tta, args.coverage, args.batch_size,
                             args.output, args.runs, args.device, args.precision, args.threads)
    except (FileNotFoundError, CheckpointError, ValueError) as err:  # a bad --model: one line
        parser.error(str(err))


if __name__ == "__main__":
    main()
